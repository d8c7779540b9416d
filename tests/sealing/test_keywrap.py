"""HPKE key wrapping, key files and sealed blobs."""

from __future__ import annotations

import os
import pickle

import pytest

from medtee.sealing import keywrap
from medtee.sealing.keywrap import EphemeralKey, KeyWrapError, Scheme

SCHEMES = list(Scheme)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_wrap_round_trip_and_context_binding(scheme):
    priv, pub = keywrap.generate_keypair(scheme)
    assert len(pub) == scheme.public_length
    blob = keywrap.wrap(b"k" * 32, pub, scheme=scheme, info=b"ctx-a")
    assert keywrap.unwrap(blob, priv, scheme=scheme, info=b"ctx-a") == b"k" * 32
    with pytest.raises(KeyWrapError, match="wrong context"):
        keywrap.unwrap(blob, priv, scheme=scheme, info=b"ctx-b")
    other, _ = keywrap.generate_keypair(scheme)
    with pytest.raises(KeyWrapError, match="wrong private key"):
        keywrap.unwrap(blob, other, scheme=scheme, info=b"ctx-a")
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(KeyWrapError):
        keywrap.unwrap(bytes(tampered), priv, scheme=scheme, info=b"ctx-a")


def test_default_is_hybrid_post_quantum():
    assert keywrap.DEFAULT_SCHEME is Scheme.MLKEM768_X25519
    assert EphemeralKey.generate().scheme is Scheme.MLKEM768_X25519


def test_scheme_mismatch_and_misuse_are_refused():
    priv, pub = keywrap.generate_keypair(Scheme.X25519)
    hpriv, hpub = keywrap.generate_keypair(Scheme.MLKEM768_X25519)
    with pytest.raises(KeyWrapError, match="must be 1216 bytes"):
        keywrap.wrap(b"s", pub, scheme=Scheme.MLKEM768_X25519, info=b"i")
    blob = keywrap.wrap(b"s", hpub, scheme="hpke-mlkem768-x25519", info=b"i")
    with pytest.raises(KeyWrapError, match="expected hpke-x25519"):
        keywrap.unwrap(blob, priv, scheme=Scheme.X25519, info=b"i")
    with pytest.raises(ValueError, match="info must be non-empty"):
        keywrap.wrap(b"s", pub, scheme=Scheme.X25519, info=b"")
    with pytest.raises(ValueError, match="use one of"):
        Scheme.parse("rsa-oaep")
    assert Scheme.for_public_key(pub) is Scheme.X25519 and Scheme.for_public_key(hpub) is Scheme.MLKEM768_X25519


def test_private_keys_cannot_be_pickled_or_printed():
    eph = EphemeralKey.generate()
    handle, _ = keywrap.generate_keypair()
    for obj in (eph, handle):
        with pytest.raises(TypeError):
            pickle.dumps(obj)
        assert "key_id=" in repr(obj) and "_key" not in repr(obj)
    assert not any(hasattr(eph, a) for a in ("private_bytes", "private_bytes_raw", "export"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_key_files(tmp_path, scheme):
    pub_path = keywrap.write_keypair(tmp_path / "keys", "owner", scheme)
    priv_path = tmp_path / "keys" / "owner.key"
    assert pub_path.name == "owner.pub" and oct(priv_path.stat().st_mode & 0o777) == "0o600"
    s, pub = keywrap.load_public_key(pub_path)
    s2, handle = keywrap.load_private_key(priv_path)
    assert s is scheme and s2 is scheme and handle.public_bytes == pub
    assert keywrap.unwrap(keywrap.wrap(b"x", pub, scheme=s, info=b"i"), handle, scheme=s, info=b"i") == b"x"
    with pytest.raises(FileExistsError, match="never overwritten"):
        keywrap.write_keypair(tmp_path / "keys", "owner", scheme)
    with pytest.raises(KeyWrapError, match="expected a private key"):
        keywrap.load_private_key(pub_path)
    os.chmod(priv_path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        keywrap.load_private_key(priv_path)
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(KeyWrapError, match="keys new"):
        keywrap.load_public_key(tmp_path / "junk.pub")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sealed_blob(scheme):
    priv, pub = keywrap.generate_keypair(scheme)
    payload = os.urandom(100_000)
    blob = keywrap.seal_blob(payload, pub, scheme=scheme, info=b"adapter:run-1")
    assert payload not in blob
    assert keywrap.open_blob(blob, priv, info=b"adapter:run-1") == payload
    with pytest.raises(KeyWrapError):
        keywrap.open_blob(blob, priv, info=b"adapter:run-2")
    for pos in (4, 20, len(blob) // 2, len(blob) - 1):  # scheme byte, wrapped key, ciphertext, tag
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(KeyWrapError):
            keywrap.open_blob(bytes(bad), priv, info=b"adapter:run-1")
    with pytest.raises(KeyWrapError, match="truncated"):
        keywrap.open_blob(blob[:40], priv, info=b"adapter:run-1")

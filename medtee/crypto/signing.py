"""The data owner's Ed25519 signing key (manifests): created on first use (PEM, mode 0600) beside its public half."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medtee.files import NotRegularFile, read_regular, write_new

OWNER_KEY_NAME = "owner-signing"
MAX_KEY_BYTES = 64 << 10  # a PEM key file is far smaller


def load_or_create_signing_key(directory: Path | str) -> Ed25519PrivateKey:
    """The owner key in `directory/owner-signing.key`, generated (with `.pub`) if absent."""
    directory = Path(directory)
    private_path, public_path = directory / f"{OWNER_KEY_NAME}.key", directory / f"{OWNER_KEY_NAME}.pub"
    if not private_path.exists() and os.path.lexists(public_path):
        raise ValueError(f"{private_path} is missing but {public_path} is there: the data owner's signing key was "
                         f"moved or deleted; restore it from its backup (a new key would sign as another owner, and "
                         f"every dataset it signed would fail `dataset inspect --owner-key {public_path}`)")
    if not private_path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        try:
            write_new(private_path, pem, mode=0o600)  # a concurrent reader sees no key or all of it
            write_new(public_path, public_pem(key.public_key()))
        except FileExistsError:  # another process created it first: use theirs
            pass
    if os.stat(private_path).st_mode & 0o077:
        raise PermissionError(f"owner signing key {private_path} is accessible by group/others; run `chmod 600 {private_path}`")
    try:
        key = serialization.load_pem_private_key(read_regular(private_path, MAX_KEY_BYTES), password=None)
    except NotRegularFile as e:
        raise ValueError(f"owner signing key {private_path} {e}; restore the key file from its backup") from None
    except (ValueError, TypeError):
        raise ValueError(f"owner signing key {private_path} is not an unencrypted PEM private key (damaged?); "
                         f"restore it from its backup") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{private_path} is not an Ed25519 private key; move it away and let medtee create a new one")
    return key


def public_pem(key: Ed25519PublicKey) -> bytes:
    """PEM SubjectPublicKeyInfo of an Ed25519 public key."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public(path: Path | str) -> Ed25519PublicKey:
    """An owner public key from a PEM file (e.g. `owner-signing.pub`)."""
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(read_regular(path, MAX_KEY_BYTES))
    except FileNotFoundError:
        raise FileNotFoundError(f"owner public key {path} does not exist") from None
    except NotRegularFile as e:
        raise ValueError(f"owner public key {path} {e}; pass the data owner's owner-signing.pub") from None
    except ValueError:
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not a PEM Ed25519 public key (expected the data owner's owner-signing.pub)")
    return key

"""Parquet Modular Encryption key management: the in-memory KMS that holds a dataset's data key as PME master key.

pyarrow's CryptoFactory generates per-file data-encryption keys, wraps them with key-encryption keys, and asks a
KmsClient to wrap those with the master key. Here the master key is the dataset's 256-bit data key and the KmsClient
wraps with AES-256-GCM in memory (the master-key id is the associated data), so nothing key-related touches disk
except wrapped keys inside the encrypted Parquet footers.

Other KMSs (a cloud KMS, HashiCorp Vault, a Confidential Containers key broker) plug in as any
`pyarrow.parquet.encryption.KmsClient` subclass through `kms_client_factory` of :func:`decryption_properties`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Callable
from datetime import timedelta

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medtee.sealing.manifest import CIPHER

DATA_KEY_BYTES = 32


def master_key_id(data_key: bytes) -> str:
    """The PME master-key identifier of a data key (derived from it; reveals nothing about it)."""
    return "medtee-dk-" + hmac.new(data_key, b"medtee/pme-master-key-id/v1", hashlib.sha256).hexdigest()[:24]


def _kms_client_class():
    import pyarrow.parquet.encryption as pe

    class AesGcmKmsClient(pe.KmsClient):
        """Wraps PME keys with AES-256-GCM under master keys held in memory."""

        def __init__(self, master_keys: dict[str, bytes]) -> None:
            super().__init__()
            self._keys = dict(master_keys)

        def _aead(self, master_key_identifier: str) -> AESGCM:
            try:
                return AESGCM(self._keys[master_key_identifier])
            except KeyError:
                raise KeyError(
                    f"master key {master_key_identifier!r} is not configured in this KMS client: wrong data key"
                ) from None

        def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> bytes:
            nonce = os.urandom(12)
            ct = self._aead(master_key_identifier).encrypt(nonce, key_bytes, master_key_identifier.encode())
            return base64.b64encode(nonce + ct)

        def unwrap_key(self, wrapped_key: bytes, master_key_identifier: str) -> bytes:
            raw = base64.b64decode(wrapped_key)
            try:
                return self._aead(master_key_identifier).decrypt(raw[:12], raw[12:], master_key_identifier.encode())
            except InvalidTag:
                raise ValueError(f"wrapped key under master key {master_key_identifier!r} does not authenticate") from None

    return AesGcmKmsClient


def _connection():
    import pyarrow.parquet.encryption as pe

    return pe.KmsConnectionConfig(kms_instance_id="medtee-in-memory")


def encryption_properties(data_key: bytes):
    """File encryption properties for one shard: AES_GCM_V1, encrypted footer, uniform encryption, 256-bit keys."""
    import pyarrow.parquet.encryption as pe

    _check_data_key(data_key)
    mk = master_key_id(data_key)
    cls = _kms_client_class()
    factory = pe.CryptoFactory(lambda _config: cls({mk: data_key}))  # fresh factory: no cache shared across keys
    config = pe.EncryptionConfiguration(
        footer_key=mk,
        uniform_encryption=True,
        encryption_algorithm=CIPHER,
        plaintext_footer=False,
        double_wrapping=True,
        internal_key_material=True,
        data_key_length_bits=256,
    )
    return factory.file_encryption_properties(_connection(), config)


def decryption_properties(
    data_key: bytes | None = None,
    *,
    kms_client_factory: Callable | None = None,
    kms_connection_config=None,
    parquet_file_path=None,
    cache_lifetime: timedelta | None = None,
):
    """File decryption properties: for a medtee data key, or for another writer's KMS (`kms_client_factory`).

    `parquet_file_path` is needed only for files whose key material is external (stored beside the file).
    """
    import pyarrow.parquet.encryption as pe

    if (data_key is None) == (kms_client_factory is None):
        raise ValueError("pass exactly one of data_key (a medtee dataset) or kms_client_factory (another writer's KMS)")
    if data_key is not None:
        _check_data_key(data_key)
        cls = _kms_client_class()
        keys = {master_key_id(data_key): data_key}
        kms_client_factory = lambda _config: cls(keys)  # noqa: E731
        kms_connection_config = _connection()
    factory = pe.CryptoFactory(kms_client_factory)
    decryption = pe.DecryptionConfiguration(cache_lifetime=cache_lifetime) if cache_lifetime else None
    return factory.file_decryption_properties(
        kms_connection_config or pe.KmsConnectionConfig(), decryption, parquet_file_path=parquet_file_path
    )


def _check_data_key(data_key: bytes) -> None:
    if not isinstance(data_key, (bytes, bytearray)) or len(data_key) != DATA_KEY_BYTES:
        raise ValueError(f"a data key is {DATA_KEY_BYTES} bytes; got {type(data_key).__name__} of another length")

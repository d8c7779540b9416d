"""The receipt key: an Ed25519 key made in the TEE's memory for one run, bound into its evidence (REPORT_DATA field
`receipt_public_key`), used once to sign the receipt as a DSSE envelope (securesystemslib), never written anywhere.

DSSE details: payloadType `application/vnd.in-toto+json`, one signature whose `keyid` is the SHA-256 hex of the raw
public key (the id the broker audits as `receipt_key`).
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from medtee.files import write_atomic
from medtee.receipt.statement import PAYLOAD_TYPE, statement_bytes

RECEIPT_FILE = "receipt.dsse.json"


def key_id(public_bytes: bytes) -> str:
    """SHA-256 hex of a raw Ed25519 public key."""
    return hashlib.sha256(bytes(public_bytes)).hexdigest()


def sslib_key(public_bytes: bytes):
    """The securesystemslib `SSlibKey` (ed25519, keyid `key_id`) of a raw public key; ValueError if it is not one."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from securesystemslib.signer import SSlibKey

    return SSlibKey.from_crypto(Ed25519PublicKey.from_public_bytes(bytes(public_bytes)), key_id(public_bytes), "ed25519")


class ReceiptSigner:
    """An in-memory Ed25519 receipt key: not printable, not picklable, no export method."""

    __slots__ = ("_private", "_public", "_signer")

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from securesystemslib.signer import CryptoSigner

        private = self._private = Ed25519PrivateKey.generate()
        self._public = private.public_key().public_bytes_raw()
        self._signer = CryptoSigner(private, sslib_key(self._public))

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte public key: pass it as `receipt_public_key` to the binding and the release."""
        return self._public

    @property
    def key_id(self) -> str:
        """SHA-256 hex of `public_bytes`."""
        return key_id(self._public)

    def sign_close(self, release_id: str, record: dict) -> bytes:
        """The Ed25519 signature that closes release `release_id` with `record` at the broker (only this key,
        which the release bound, can)."""
        from medtee.broker.protocol import close_message

        return self._private.sign(close_message(release_id, record))

    def sign(self, statement: dict) -> dict:
        """The DSSE envelope (JSON-ready dict) of `statement`, which must name this key as its receipt key."""
        from securesystemslib.dsse import Envelope

        named = statement.get("predicate", {}).get("binding", {}).get("receipt_public_key")
        if named != base64.b64encode(self._public).decode("ascii"):
            raise ValueError("receipt: the statement names another receipt_public_key than this signer's; build it "
                             "with receipt_public_key=signer.public_bytes")
        envelope = Envelope(statement_bytes(statement), PAYLOAD_TYPE, {})
        envelope.sign(self._signer)
        return envelope.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key_id={self.key_id[:16]})"

    def __reduce__(self):
        raise TypeError(f"{type(self).__name__} holds a private key and cannot be pickled or copied out of memory")


def write_receipt(envelope: dict, directory: Path | str, name: str = RECEIPT_FILE) -> Path:
    """Write `envelope` to DIRECTORY/NAME (receipt.dsse.json) atomically; its path."""
    path = Path(directory) / name
    write_atomic(path, (json.dumps(envelope, indent=1, sort_keys=True) + "\n").encode())
    return path

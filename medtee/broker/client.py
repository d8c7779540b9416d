"""HttpBroker: the client of `medtee broker serve` (protocol in medtee.broker.server), implementing KeyBroker.

Plain http:// is refused except to loopback, since a tampered answer to `public-key` would make the sealer wrap the
data key to someone else. Answers are read up to MAX_RESPONSE_BYTES and validated like requests are.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from medtee.broker.protocol import (
    MAX_NONCE_BYTES,
    MAX_PUBLIC_KEY_BYTES,
    MIN_NONCE_BYTES,
    CloseNotAuthorized,
    KeyReleaseDenied,
    ReleaseClosedError,
    ReleaseRecord,
    RequestError,
    UnknownDatasetError,
    check_close_record,
    check_digest,
    decode_b64,
    is_loopback_url,
    parse_json,
)
from medtee.crypto.hpke import Scheme
from medtee.crypto.signing import load_or_create_signing_key
from medtee.sealing.manifest import Manifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from medtee.attestation.evidence import Evidence
    from medtee.attestation.verdict import Verdict

MAX_RESPONSE_BYTES = 1 << 20
MAX_WRAPPED_KEY_BYTES = 4096


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class BrokerError(RuntimeError):
    """The remote broker could not be reached, answered with an error, or sent an answer this client refuses."""


class HttpBroker:
    """Client of `medtee broker serve`, implementing the KeyBroker contract."""

    def __init__(self, url: str, *, store_dir: Path | str, ca: str = "", timeout_s: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"broker URL {url!r} must look like https://host:port")
        if parts.scheme == "http" and not is_loopback_url(url):
            raise ValueError(f"broker URL {url!r}: plain http is allowed only on loopback; serve the broker with TLS "
                             "(--tls-cert/--tls-key) and use https://")
        self.url = url.rstrip("/")
        self.store_dir = Path(store_dir)
        self._timeout = timeout_s
        self._ssl = ssl.create_default_context(cafile=ca or None) if parts.scheme == "https" else None

    def _answer(self, raw: bytes) -> dict:
        if len(raw) > MAX_RESPONSE_BYTES:
            raise BrokerError(f"key broker at {self.url} sent an answer over {MAX_RESPONSE_BYTES} bytes")
        try:
            doc = parse_json(raw, "answer")
        except RequestError as e:
            raise BrokerError(f"key broker at {self.url}: {e}") from None
        if not isinstance(doc, dict):
            raise BrokerError(f"key broker at {self.url}: answer is not a JSON object")
        return doc

    def _call(self, method: str, path: str, doc: dict | None = None) -> tuple[int, dict]:
        data = None if doc is None else json.dumps(doc).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._ssl) as resp:
                return resp.status, self._answer(resp.read(MAX_RESPONSE_BYTES + 1))
        except urllib.error.HTTPError as e:
            with e:
                raw = e.read(MAX_RESPONSE_BYTES + 1)
            try:
                return e.code, self._answer(raw)
            except BrokerError:
                return e.code, {"error": str(e.reason)[:200]}
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise BrokerError(f"key broker at {self.url} is unreachable ({reason}); is `medtee broker serve` running?") from None

    def _ok(self, status: int, body: dict, what: str) -> dict:
        if status in (200, 201):
            return body
        message = str(body.get("error", "no detail"))
        if status == 404:
            raise UnknownDatasetError(message)
        if status == 409:
            raise ReleaseClosedError(message)
        if status == 403:
            raise PermissionError(f"key broker at {self.url} refused {what}: {message}")
        raise BrokerError(f"key broker at {self.url} answered {status} to {what}: {message}")

    def _bytes(self, body: dict, name: str, max_bytes: int, min_bytes: int = 1) -> bytes:
        try:
            return decode_b64(body.get(name), name, max_bytes, min_bytes)
        except RequestError as e:
            raise BrokerError(f"key broker at {self.url} sent a malformed answer: {e}") from None

    def public_key(self) -> tuple[Scheme, bytes]:
        body = self._ok(*self._call("GET", "/v1/public-key"), "public-key")
        try:
            scheme = Scheme(body.get("scheme"))
        except ValueError:
            raise BrokerError(f"key broker at {self.url} names a key scheme this client does not know") from None
        return scheme, self._bytes(body, "public_key", MAX_PUBLIC_KEY_BYTES)

    def owner_signing_key(self) -> Ed25519PrivateKey:
        """The data owner's signing key kept locally in `store_dir` (the remote broker must trust its .pub)."""
        return load_or_create_signing_key(self.store_dir)

    def register(self, manifest: Manifest) -> None:
        self._ok(*self._call("POST", "/v1/datasets", json.loads(manifest.to_json())), "registration")

    def challenge(self, dataset_id: str) -> bytes:
        body = self._ok(*self._call("POST", "/v1/challenge", {"dataset_id": dataset_id}), "challenge")
        return self._bytes(body, "nonce", MAX_NONCE_BYTES, MIN_NONCE_BYTES)

    def _digest(self, body: dict, name: str) -> str:
        try:
            return check_digest(body.get(name), name)
        except RequestError as e:
            raise BrokerError(f"key broker at {self.url} sent a malformed answer: {e}") from None

    def release(self, *, dataset_id: str, nonce: bytes, evidence: Evidence, ephemeral_public_key: bytes,
                recipe_digest: str, manifest_digest: str, receipt_public_key: bytes | None = None,
                recipe: dict | None = None) -> tuple[bytes, ReleaseRecord]:
        request = {"dataset_id": dataset_id, "nonce": _b64(nonce), "evidence": evidence.to_json(),
                   "ephemeral_public_key": _b64(ephemeral_public_key), "recipe_digest": recipe_digest,
                   "manifest_digest": manifest_digest}
        if receipt_public_key is not None:
            request["receipt_public_key"] = _b64(receipt_public_key)
        if recipe is not None:
            request["recipe"] = recipe
        status, body = self._call("POST", "/v1/release", request)
        if status == 403 and isinstance(body.get("verdict"), dict):
            raise KeyReleaseDenied(self._verdict(body["verdict"]), dataset_id)
        body = self._ok(status, body, "release")
        return (self._bytes(body, "wrapped_key", MAX_WRAPPED_KEY_BYTES),
                ReleaseRecord(self._digest(body, "release_id"), self._digest(body, "audit_entry_sha256")))

    def close_release(self, release_id: str, *, record: dict, receipt_public_key: bytes, signature: bytes) -> str:
        request = {"release_id": release_id, "record": check_close_record(record),
                   "receipt_public_key": _b64(receipt_public_key), "signature": _b64(signature)}
        status, body = self._call("POST", "/v1/release/close", request)
        if status == 403:  # the broker's one answer for every cause (protocol.CLOSE_REFUSED)
            raise CloseNotAuthorized(f"key broker at {self.url} refused to close release {release_id[:16]}...: "
                                     f"{body.get('error', 'no detail')}")
        return self._digest(self._ok(status, body, "close"), "audit_entry_sha256")

    def _verdict(self, v: dict) -> Verdict:
        from medtee.attestation.verdict import Check, Verdict

        try:
            checks = tuple(Check(str(c["name"]), bool(c["ok"]), str(c["expected"]), str(c["actual"]))
                           for c in v.get("checks", []))
        except (KeyError, TypeError):
            raise BrokerError(f"key broker at {self.url} sent a malformed denial") from None
        return Verdict(ok=False, checks=checks, simulated=bool(v.get("simulated")), policy=str(v.get("policy", "")))

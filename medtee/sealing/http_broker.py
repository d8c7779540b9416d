"""The key broker over HTTP: `medtee broker serve` (stdlib ThreadingHTTPServer) and the matching client.

Endpoints (JSON bodies, binary values base64):
  GET  /v1/health                   {"ok": true}
  GET  /v1/public-key               {"scheme", "public_key", "key_id"}
  POST /v1/datasets   manifest JSON -> 201 {"dataset_id", "manifest_digest"}  (signed by a trusted owner key)
  POST /v1/challenge  {"dataset_id"} -> {"nonce", "expires_in_s"}
  POST /v1/release    {"dataset_id", "nonce", "evidence", "ephemeral_public_key", "recipe_digest", "manifest_digest"}
                      -> {"wrapped_key"} | 403 {"error", "verdict"} listing every check
Errors: 400 malformed request, 403 refused, 404 unknown dataset or path, 413 body too large, 500 broker fault.
Listens on loopback by default; give a certificate and key for TLS. The client refuses plain http:// to anything
but loopback, since a tampered answer to `public-key` would make the sealer wrap the data key to someone else.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from medtee.sealing.broker import DEFAULT_NONCE_TTL_S, EmbeddedBroker, KeyReleaseDenied, UnknownDatasetError
from medtee.sealing.keywrap import Scheme, key_id
from medtee.sealing.manifest import Manifest, SealedDataError
from medtee.sealing.owner import load_or_create_signing_key

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from medtee.attestation.evidence import Evidence

MAX_BODY_BYTES = 4 << 20
DEFAULT_PORT = 8765


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _BadRequest(ValueError):
    pass


def _field(doc: dict, name: str, kind: type) -> object:
    value = doc.get(name)
    if not isinstance(value, kind):
        raise _BadRequest(f"field '{name}' must be a {'base64 string' if kind is bytes else kind.__name__}")
    return value


def _bytes_field(doc: dict, name: str) -> bytes:
    try:
        return base64.b64decode(_field(doc, name, str), validate=True)
    except ValueError:
        raise _BadRequest(f"field '{name}' is not valid base64") from None


class _Handler(BaseHTTPRequestHandler):
    server: BrokerServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:
        if not self.server.quiet:
            sys.stderr.write(f"medtee broker: {self.address_string()} {fmt % args}\n")

    def _send(self, status: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> object:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise _BadRequest("Content-Length header is required") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise OverflowError
        try:
            return json.loads(self.rfile.read(length))
        except ValueError:
            raise _BadRequest("body must be JSON") from None

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        broker = self.server.broker
        if self.path == "/v1/health":
            self._send(200, {"ok": True})
        elif self.path == "/v1/public-key":
            scheme, public = broker.public_key()
            self._send(200, {"scheme": scheme.value, "public_key": _b64(public), "key_id": key_id(scheme, public)})
        else:
            self._send(404, {"error": f"no such endpoint {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        route = {"/v1/datasets": self._register, "/v1/challenge": self._challenge, "/v1/release": self._release}
        handler = route.get(self.path)
        try:
            if handler is None:
                self._send(404, {"error": f"no such endpoint {self.path}"})
                return
            doc = self._body()
            if not isinstance(doc, dict):
                raise _BadRequest("body must be a JSON object")
            handler(doc)
        except OverflowError:
            self._send(413, {"error": f"request body larger than {MAX_BODY_BYTES} bytes"})
        except (_BadRequest, SealedDataError) as e:
            self._send(400, {"error": str(e)})
        except UnknownDatasetError as e:
            self._send(404, {"error": str(e)})
        except PermissionError as e:
            self._send(403, {"error": str(e)})
        except Exception as e:  # never leak a traceback to the client; log the type on the server
            sys.stderr.write(f"medtee broker: internal error on {self.path}: {type(e).__name__}: {e}\n")
            self._send(500, {"error": f"internal broker error ({type(e).__name__})"})

    def _register(self, doc: dict) -> None:
        manifest = Manifest.from_json(json.dumps(doc), source="registration request")
        try:
            self.server.broker.register(manifest)
        except (ValueError, FileExistsError) as e:
            raise _BadRequest(str(e)) from None
        self._send(201, {"dataset_id": manifest.dataset_id, "manifest_digest": manifest.digest()})

    def _challenge(self, doc: dict) -> None:
        nonce = self.server.broker.challenge(_field(doc, "dataset_id", str))
        self._send(200, {"nonce": _b64(nonce), "expires_in_s": self.server.broker.nonce_ttl_s})

    def _release(self, doc: dict) -> None:
        from medtee.attestation import Evidence

        try:
            evidence = Evidence.from_json(_field(doc, "evidence", dict))
        except ValueError as e:
            raise _BadRequest(str(e)) from None
        try:
            wrapped = self.server.broker.release(
                dataset_id=_field(doc, "dataset_id", str), nonce=_bytes_field(doc, "nonce"), evidence=evidence,
                ephemeral_public_key=_bytes_field(doc, "ephemeral_public_key"),
                recipe_digest=_field(doc, "recipe_digest", str), manifest_digest=_field(doc, "manifest_digest", str))
        except KeyReleaseDenied as e:
            self._send(403, {"error": "key release denied", "verdict": e.verdict.to_json()})
            return
        self._send(200, {"wrapped_key": _b64(wrapped)})


class BrokerServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer around an EmbeddedBroker; bound and accepting once constructed."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, broker: EmbeddedBroker, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                 tls_cert: str | None = None, tls_key: str | None = None, quiet: bool = False) -> None:
        self.broker = broker
        self.quiet = quiet
        super().__init__((host, port), _Handler)
        self.tls = bool(tls_cert)
        if tls_cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(tls_cert, tls_key)
            self.socket = ctx.wrap_socket(self.socket, server_side=True)

    @property
    def url(self) -> str:
        """The base URL clients use."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{port}"


def serve(store_dir: Path | str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, tls_cert: str | None = None,
          tls_key: str | None = None, nonce_ttl_s: float = DEFAULT_NONCE_TTL_S,
          announce: Callable[[str], None] = print) -> None:
    """Run the broker until interrupted; `announce(url)` is called once the socket accepts connections."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    server = BrokerServer(EmbeddedBroker(store_dir, nonce_ttl_s=nonce_ttl_s), host, port, tls_cert=tls_cert,
                          tls_key=tls_key)
    announce(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BrokerError(RuntimeError):
    """The remote broker could not be reached or answered with an error."""


class HttpBroker:
    """Client of `medtee broker serve`, implementing the KeyBroker contract."""

    def __init__(self, url: str, *, store_dir: Path | str, ca: str = "", timeout_s: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"broker URL {url!r} must look like https://host:port")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError(f"broker URL {url!r}: plain http is allowed only on loopback; serve the broker with TLS "
                             "(--tls-cert/--tls-key) and use https://")
        self.url = url.rstrip("/")
        self.store_dir = Path(store_dir)
        self._timeout = timeout_s
        self._ssl = ssl.create_default_context(cafile=ca or None) if parts.scheme == "https" else None

    def _call(self, method: str, path: str, doc: dict | None = None) -> tuple[int, dict]:
        data = None if doc is None else json.dumps(doc).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._ssl) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                body = json.loads(e.read())
            except ValueError:
                body = {"error": e.reason}
            return e.code, body
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise BrokerError(f"key broker at {self.url} is unreachable ({reason}); is `medtee broker serve` running?") from None

    def _ok(self, status: int, body: dict, what: str) -> dict:
        if status in (200, 201):
            return body
        message = body.get("error", "no detail")
        if status == 404:
            raise UnknownDatasetError(message)
        if status == 403:
            raise PermissionError(f"key broker at {self.url} refused {what}: {message}")
        raise BrokerError(f"key broker at {self.url} answered {status} to {what}: {message}")

    def public_key(self) -> tuple[Scheme, bytes]:
        body = self._ok(*self._call("GET", "/v1/public-key"), "public-key")
        return Scheme.parse(body["scheme"]), base64.b64decode(body["public_key"])

    def owner_signing_key(self) -> Ed25519PrivateKey:
        """The data owner's signing key kept locally in `store_dir` (the remote broker must trust its .pub)."""
        return load_or_create_signing_key(self.store_dir)

    def register(self, manifest: Manifest) -> None:
        self._ok(*self._call("POST", "/v1/datasets", json.loads(manifest.to_json())), "registration")

    def challenge(self, dataset_id: str) -> bytes:
        body = self._ok(*self._call("POST", "/v1/challenge", {"dataset_id": dataset_id}), "challenge")
        return base64.b64decode(body["nonce"])

    def release(self, *, dataset_id: str, nonce: bytes, evidence: Evidence, ephemeral_public_key: bytes,
                recipe_digest: str, manifest_digest: str) -> bytes:
        from medtee.attestation.verdict import Check, Verdict

        status, body = self._call("POST", "/v1/release", {
            "dataset_id": dataset_id, "nonce": _b64(nonce), "evidence": evidence.to_json(),
            "ephemeral_public_key": _b64(ephemeral_public_key), "recipe_digest": recipe_digest,
            "manifest_digest": manifest_digest})
        if status == 403 and isinstance(body.get("verdict"), dict):
            v = body["verdict"]
            checks = tuple(Check(c["name"], c["ok"], c["expected"], c["actual"]) for c in v.get("checks", []))
            raise KeyReleaseDenied(Verdict(ok=False, checks=checks, simulated=bool(v.get("simulated")),
                                           policy=str(v.get("policy", ""))), dataset_id)
        return base64.b64decode(self._ok(status, body, "release")["wrapped_key"])

"""The key broker over HTTP: a Starlette app around an EmbeddedBroker, served by uvicorn (`medtee broker serve`).

Wire protocol v1 (JSON bodies, binary values base64; every error body is `{"error": message}`):
  GET  /v1/health                    200 {"ok": true}
  GET  /v1/public-key                200 {"scheme", "public_key", "key_id"}
  POST /v1/datasets   manifest JSON  201 {"dataset_id", "manifest_digest"}  (signed by a trusted owner key)
  POST /v1/challenge  {"dataset_id"} 200 {"nonce", "expires_in_s"}
  POST /v1/release    {"dataset_id", "nonce", "evidence", "ephemeral_public_key", "recipe_digest", "manifest_digest"
                      [, "receipt_public_key"]}
                                     200 {"wrapped_key", "release_id", "audit_entry_sha256"}
                                     | 403 {"error", "verdict"} listing every check
  POST /v1/release/close {"release_id", "record", "receipt_public_key", "signature"} (signed by the receipt key)
                                     200 {"release_id", "audit_entry_sha256"} (of the close entry; a repeat with
                                     the same record answers the same) | 403 one answer for an unknown release,
                                     one without receipt key, another key or a bad signature | 409 closed already
                                     with another record (only to the receipt key's holder)
Bodies are validated by `medtee.broker.protocol` (exact field sets, sizes, digests as 64 lowercase hex characters).
Status codes: 400 malformed request (JSON, schema, Content-Length, a body cut short), 403 refused, 404 unknown dataset
or path, 405 wrong method, 408 body not received within `Limits.body_timeout_s`, 409 a release closed again with
another record, 413 body over `Limits.max_body_bytes` (declared or streamed), 429 too many outstanding challenges for
the dataset or the client (with Retry-After), 503 connection limit or large-body memory cap reached, or an audit log
that must be restored first (damaged, or behind its high-water mark: its log line says which); 500 only for a
fault of the broker itself (its log names the exception type, never a message). An answer sent before the whole
body was read closes the connection, so the rest of that body is never parsed as a request.

Connections: h11 parses requests (headers up to 16 KiB); each request's headers must arrive within
`Limits.idle_timeout_s` of the connection opening or of the previous answer, its body within `body_timeout_s`; at
most `max_connections` connections, `max_connections_per_client` of them from one client (an IPv4 address, an IPv6
/64), counted from the moment each is accepted, TLS handshake included (`_Listener`); bodies beyond their
first 256 KiB may hold at most `max_large_body_bytes` together; broker calls run on at most `worker_threads`
threads, so neither idle nor slow clients hold threads.
TLS (`tls_cert`/`tls_key`): uvicorn's server context, TLS 1.2 or later (Python's default since 3.10); a handshake
must end within `Limits.handshake_timeout_s` of the connection opening. Listens on loopback by default.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import ipaddress
import math
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from medtee.broker.audit import AuditLogDamaged
from medtee.broker.protocol import (
    ChallengeRefused,
    KeyReleaseDenied,
    RequestError,
    ReleaseClosedError,
    UnknownDatasetError,
    parse_challenge_request,
    parse_close_request,
    parse_json,
    parse_release_request,
)
from medtee.broker.service import EmbeddedBroker
from medtee.crypto.hpke import key_id

DEFAULT_PORT = 8765
MAX_ERROR_CHARS = 1000  # of an error message in an answer
SMALL_BODY_BYTES = 256 << 10  # a body up to this size (every release medtee sends) is never refused for memory
GRACEFUL_SHUTDOWN_S = 5
_ROUTES = ("/v1/health", "/v1/public-key", "/v1/datasets", "/v1/challenge", "/v1/release", "/v1/release/close")
_NO_STORE = {"Cache-Control": "no-store"}


@dataclass(frozen=True)
class Limits:
    """Resource limits of the HTTP service (the defaults are what `medtee broker serve` uses)."""

    max_body_bytes: int = 4 << 20  # a request body, declared or streamed
    max_large_body_bytes: int = 8 << 20  # of all bodies under way together, beyond the first 256 KiB of each
    body_timeout_s: float = 10.0  # for a whole request body, from the end of its headers
    idle_timeout_s: float = 5.0  # for a request's headers, from the connection opening or the previous answer
    handshake_timeout_s: float = 5.0  # for a TLS handshake, from the connection opening (asyncio's default: 60)
    max_connections: int = 256  # open connections, TLS handshakes included: one beyond is closed once accepted
    max_connections_per_client: int = 16  # of them from one client (`client_key`): one beyond is closed once accepted
    worker_threads: int = 16  # threads running broker calls (file I/O, appraisal)


def _json(status: int, doc: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(doc, status, headers={**_NO_STORE, **(headers or {})})


def _error(status: int, message: object, headers: dict | None = None) -> JSONResponse:
    return _json(status, {"error": str(message)[:MAX_ERROR_CHARS]}, headers)


async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, exc.detail, exc.headers)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _log(line: str) -> None:
    sys.stderr.write(f"medtee broker: {line}\n")


class _Guard:
    """ASGI middleware: refuses an ambiguous or too large declared body up front, enforces the size limits and the
    deadline while the body streams in, closes the connection after an answer sent before the whole body was read,
    and logs one line per request (known paths and methods only: no client-supplied text)."""

    def __init__(self, app, limits: Limits, quiet: bool) -> None:
        self.app, self.limits, self.quiet = app, limits, quiet
        self.large_bytes = 0  # of the bodies under way, beyond the first SMALL_BODY_BYTES of each

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limits, loop = self.limits, asyncio.get_running_loop()
        headers = dict(scope["headers"])
        declared, chunked = headers.get(b"content-length"), b"transfer-encoding" in headers
        body_done = declared in (None, b"0") and not chunked
        deadline, received, held = loop.time() + limits.body_timeout_s, 0, 0

        async def guarded_receive():
            nonlocal body_done, received, held
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise HTTPException(408, f"request body not received within {limits.body_timeout_s:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limits.max_body_bytes:
                    raise HTTPException(413, f"request body larger than {limits.max_body_bytes} bytes")
                more = max(0, received - SMALL_BODY_BYTES) - held
                if self.large_bytes + more > limits.max_large_body_bytes:
                    raise HTTPException(503, "the broker is receiving too many large bodies; retry shortly",
                                        {"Retry-After": "1"})
                self.large_bytes, held = self.large_bytes + more, held + more
                body_done = not message.get("more_body", False)
            return message

        async def logged_send(message) -> None:
            if message["type"] == "http.response.start":
                if not body_done:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
                if not self.quiet:
                    client = (scope.get("client") or ("-",))[0]
                    method = scope["method"] if scope["method"] in ("GET", "HEAD", "POST") else "(other method)"
                    path = scope["path"] if scope["path"] in _ROUTES else "(other path)"
                    _log(f"{client} {method} {path} {message['status']}")
            await send(message)

        if declared is not None and (chunked or not declared.isdigit()):  # h11 refuses most of these already
            refusal = _error(400, "Content-Length must be a number of bytes, without Transfer-Encoding")
        elif declared is not None and int(declared) > limits.max_body_bytes:  # h11 allows at most 20 digits
            refusal = _error(413, f"request body larger than {limits.max_body_bytes} bytes")
        else:
            try:
                return await self.app(scope, guarded_receive, logged_send)
            finally:
                self.large_bytes -= held
        await refusal(scope, receive, logged_send)


def _endpoint(fn):
    """Map the broker's exceptions to answers; anything unexpected is a 500 naming only the exception type."""

    @functools.wraps(fn)
    async def endpoint(request: Request):
        try:
            return await fn(request)
        except HTTPException:
            raise
        except KeyReleaseDenied as e:
            return _json(403, {"error": "key release denied", "verdict": e.verdict.to_json()})
        except UnknownDatasetError as e:
            return _error(404, e.public)
        except ReleaseClosedError as e:
            return _error(409, e)
        except ChallengeRefused as e:
            return _error(429, e, {"Retry-After": str(math.ceil(e.retry_after_s))})
        except PermissionError as e:
            return _error(403, e)
        except AuditLogDamaged as e:  # names files and entry hashes, never data: for the owner, on the server only
            _log(f"refusing decisions until the owner restores the audit log: {e}")
            return _error(503, "the broker records no decision until its owner restores its audit log")
        except (ValueError, FileExistsError) as e:  # RequestError, SealedDataError, a refused registration
            return _error(400, e)
        except Exception as e:  # never leak a message or traceback; log the type on the server
            _log(f"internal error on {request.url.path}: {type(e).__name__}")
            return _error(500, f"internal broker error ({type(e).__name__})")

    return endpoint


def build_app(broker: EmbeddedBroker, limits: Limits = Limits(), *, quiet: bool = False) -> Starlette:
    """The ASGI application serving `broker` (see the module docstring for the protocol)."""
    limiter = anyio.CapacityLimiter(limits.worker_threads)

    async def call(fn, *args, **kwargs):
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=limiter)

    async def body_json(request: Request) -> object:
        body = bytearray()  # one copy (Request.body() keeps the chunks and their join)
        try:
            async for chunk in request.stream():
                body += chunk
        except ClientDisconnect:
            raise HTTPException(400, "request body cut short: the client disconnected") from None
        return await call(parse_json, body)

    def client(request: Request) -> str:
        return client_key(request.client.host if request.client else None)

    async def health(_request: Request):
        return _json(200, {"ok": True})

    async def public_key(_request: Request):
        scheme, public = broker.public_key()
        return _json(200, {"scheme": scheme.value, "public_key": _b64(public), "key_id": key_id(scheme, public)})

    async def register(request: Request):
        manifest = await call(broker.register_json, await body_json(request))
        return _json(201, {"dataset_id": manifest.dataset_id, "manifest_digest": manifest.digest()})

    async def challenge(request: Request):
        dataset_id = parse_challenge_request(await body_json(request))
        nonce = await call(broker.challenge, dataset_id, client=client(request))
        return _json(200, {"nonce": _b64(nonce), "expires_in_s": broker.nonce_ttl_s})

    async def release(request: Request):
        doc = await body_json(request)
        try:
            fields = await call(parse_release_request, doc)
        except RequestError as e:
            await call(broker.deny_malformed, e, client=client(request))
            raise
        wrapped, record = await call(broker.release, **fields, client=client(request))
        return _json(200, {"wrapped_key": _b64(wrapped), "release_id": record.release_id,
                           "audit_entry_sha256": record.audit_entry_sha256})

    async def close_release(request: Request):
        release_id, record, key, signature = parse_close_request(await body_json(request))
        entry_hash = await call(broker.close_release, release_id, record=record, receipt_public_key=key,
                                signature=signature, client=client(request))
        return _json(200, {"release_id": release_id, "audit_entry_sha256": entry_hash})

    routes = [Route("/v1/health", _endpoint(health), methods=["GET"]),
              Route("/v1/public-key", _endpoint(public_key), methods=["GET"]),
              Route("/v1/datasets", _endpoint(register), methods=["POST"]),
              Route("/v1/challenge", _endpoint(challenge), methods=["POST"]),
              Route("/v1/release", _endpoint(release), methods=["POST"]),
              Route("/v1/release/close", _endpoint(close_release), methods=["POST"])]
    return Starlette(routes=routes, middleware=[Middleware(_Guard, limits=limits, quiet=quiet)],
                     exception_handlers={HTTPException: _http_error})


def client_key(host: str | None) -> str:
    """Who a connection or request counts against for the per-client limits, and the audit log's `client`: an IPv4
    address (an IPv4-mapped IPv6 one as IPv4), the /64 of an IPv6 address (a host is routinely given a whole /64,
    so per address it could open connections without end), "-" when unknown."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "-" if host is None else host
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


class _Conn(socket.socket):
    """An accepted connection, counted by its `_Listener` until it is closed (or collected unclosed: asyncio drops
    the socket of a connection whose transport it failed to make)."""

    def close(self) -> None:
        if (forget := self.__dict__.pop("_forget", None)) is not None:
            forget()
        super().close()

    __del__ = close


class _Listener(socket.socket):
    """The listening socket: counts the connections it accepted, per `client_key` and in all, until each is closed,
    and closes one beyond `Limits.max_connections_per_client` or `max_connections` as soon as it is accepted, before
    any TLS handshake or request (the application protocol, and uvicorn's own limit, see a TLS connection only once
    its handshake is done: until then it would count against nothing). asyncio accepts and closes connections on
    its loop's thread, so the counts need no lock."""

    def configure(self, limits: Limits) -> _Listener:
        self._limits, self._open, self._total = limits, collections.Counter(), 0
        return self

    def accept(self):
        while True:  # a refused connection is closed and the next taken; BlockingIOError when none is left
            plain, address = super().accept()
            key = client_key(address[0] if address else None)
            if self._open[key] >= self._limits.max_connections_per_client or \
                    self._total >= self._limits.max_connections:
                plain.close()
                continue
            conn = _Conn(plain.family, plain.type, plain.proto, fileno=plain.detach())
            self._open[key] += 1
            self._total += 1
            conn._forget = functools.partial(self._forget, key)
            return conn, address

    def _forget(self, key: str) -> None:
        self._total -= 1
        self._open[key] -= 1
        if not self._open[key]:
            del self._open[key]


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers (uvicorn's `timeout_keep_alive`, here
    `Limits.idle_timeout_s`): uvicorn itself times out only idle kept-alive connections, so a connection that never
    sends a request, or trickles its headers, would stay open for good."""

    _headers_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        if self._headers_deadline:
            self._headers_deadline.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._headers_deadline:
            self._headers_deadline.cancel()
        self._headers_deadline = self.loop.call_later(self.timeout_keep_alive, self._expire)

    def _expire(self) -> None:
        if self.cycle is None or self.cycle.response_complete:  # no request under way: its headers are late
            self.timeout_keep_alive_handler()


class _Loop(asyncio.SelectorEventLoop):
    """asyncio's loop with a deadline on TLS handshakes: uvicorn passes none to `create_server`, so a connection that
    never completes its handshake would hold a file descriptor for asyncio's 60 s, and it counts against no limit
    until the handshake ends (`_Protocol` sees only connections past it)."""

    handshake_timeout_s = Limits.handshake_timeout_s

    async def create_server(self, *args, **kwargs):
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", self.handshake_timeout_s)
        return await super().create_server(*args, **kwargs)


class BrokerServer:
    """`broker` served by uvicorn on a background thread; bound and accepting once constructed, `close()` stops it."""

    def __init__(self, broker: EmbeddedBroker, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                 tls_cert: str | None = None, tls_key: str | None = None, limits: Limits = Limits(),
                 quiet: bool = False) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        self.broker = broker
        config = uvicorn.Config(
            build_app(broker, limits, quiet=quiet), ws="none", loop="asyncio", lifespan="off",
            http=_Protocol,
            log_config=None, log_level="warning", access_log=False, proxy_headers=False, server_header=False,
            limit_concurrency=limits.max_connections, timeout_keep_alive=limits.idle_timeout_s,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, ssl_certfile=tls_cert, ssl_keyfile=tls_key)
        config.load()  # reads the TLS files: their errors reach the caller
        plain = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock = _Listener(plain.family, plain.type, plain.proto, fileno=plain.detach()).configure(limits)
        bound_host, bound_port = sock.getsockname()[:2]
        bound_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"{'https' if tls_cert else 'http'}://{bound_host}:{bound_port}"
        self._server = uvicorn.Server(config)
        loop = type("_Loop", (_Loop,), {"handshake_timeout_s": limits.handshake_timeout_s})
        self._thread = threading.Thread(target=self._run, args=(sock, loop), daemon=True, name="medtee-broker")
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            time.sleep(0.01)
        if not self._server.started:
            sock.close()
            raise OSError(f"the key broker could not start on {self.url}")

    def _run(self, sock: socket.socket, loop: type[asyncio.AbstractEventLoop]) -> None:
        """What uvicorn.Server.run does, on `loop` (uvicorn takes a custom loop only as an import string)."""
        with asyncio.Runner(loop_factory=loop) as runner:
            runner.run(self._server.serve(sockets=[sock]))

    def close(self) -> None:
        """Stop accepting, let requests under way finish (at most GRACEFUL_SHUTDOWN_S), then return."""
        self._server.should_exit = True
        self._thread.join()

    def __enter__(self) -> BrokerServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(store_dir: Path | str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, tls_cert: str | None = None,
          tls_key: str | None = None, limits: Limits = Limits(), announce=print, **broker_options) -> None:
    """Run the broker until SIGINT or SIGTERM, then return; `announce(url)` once it accepts connections.

    `broker_options` go to EmbeddedBroker (nonce_ttl_s, max_challenges_per_dataset, max_challenges_per_client).
    """
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedBroker(store_dir, **broker_options) as broker, BrokerServer(
                broker, host, port, tls_cert=tls_cert, tls_key=tls_key, limits=limits) as server:
            announce(server.url)
            stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

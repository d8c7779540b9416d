"""The data owner's key broker: releases a dataset's data key only to a TEE whose evidence satisfies its policy.

`connect` (here) picks the broker a run or `medtee seal` talks to. Modules: config (the `broker` group's schema),
protocol (the KeyBroker contract, request validation, the TEE's client half `obtain_data_key`),
service (EmbeddedBroker, the owner's service; key rotation), audit (hash-chained log), server (the HTTP service:
Starlette on uvicorn), client (HttpBroker), cli (`medtee broker serve|audit|policy`). See docs/broker.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medtee.broker.protocol import KeyBroker


def connect(spec: str, *, store_dir: Path | str, ca: str = "", timeout_s: float = 30.0) -> KeyBroker:
    """`"embedded"` -> EmbeddedBroker(store_dir); `"http(s)://host:port"` -> a client of `medtee broker serve`.

    For the HTTP client, `store_dir` holds the data owner's signing key used when sealing against the remote broker,
    `ca` a PEM bundle to verify an https:// broker ("" = system trust store), `timeout_s` the per-request timeout.
    """
    if spec == "embedded":
        from medtee.broker.service import EmbeddedBroker

        return EmbeddedBroker(store_dir)
    if spec.startswith(("http://", "https://")):
        from medtee.broker.client import HttpBroker

        return HttpBroker(spec, store_dir=store_dir, ca=ca, timeout_s=timeout_s)
    raise ValueError(f"broker {spec!r} is neither 'embedded' nor an http(s):// URL; fix broker.url or --broker")

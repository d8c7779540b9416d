"""Schema of the `encryption` config group (conf/encryption/*.yaml). The cipher is not configurable: AES_GCM_V1."""

from __future__ import annotations

from dataclasses import dataclass

from medtee.crypto.hpke import DEFAULT_SCHEME


@dataclass
class EncryptionConfig:
    """How data keys and outputs are wrapped, and which key broker releases the data key (validated in medtee.config)."""

    # HPKE scheme (a medtee.crypto.hpke.Scheme value) for keys this run creates (ephemeral release key, encrypted outputs):
    # "hpke-mlkem768-x25519" (hybrid post-quantum, default) or "hpke-x25519" (classical).
    scheme: str = DEFAULT_SCHEME.value
    # Key broker: "embedded" (in-process, store in broker_dir) or the http(s):// URL of `medtee broker serve`.
    broker: str = "embedded"
    # Embedded broker's store (keys, registrations, audit log), relative to the current directory.
    # With a remote broker it holds only the data owner's signing key used by `medtee seal`.
    broker_dir: str = ".medtee/broker"
    # HTTP broker only: CA bundle (PEM) to verify an https:// broker; "" uses the system trust store.
    broker_ca: str = ""
    # HTTP broker only: seconds to wait for each broker request.
    broker_timeout_s: float = 30.0


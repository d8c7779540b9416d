"""Schema of the `encryption` config group. The data cipher is not configurable (Parquet Modular Encryption
AES_GCM_V1); what a recipe chooses is the HPKE scheme of the keys a run creates."""

from __future__ import annotations

from dataclasses import dataclass

from medtee.crypto.hpke import DEFAULT_SCHEME, Scheme


@dataclass
class EncryptionConfig:
    # HPKE scheme of the keys a run creates (the ephemeral release key, the encrypted outputs):
    # hpke_mlkem768_x25519 (hybrid post-quantum, the default) or hpke_x25519 (classical)
    scheme: Scheme = DEFAULT_SCHEME

    def problems(self) -> list[str]:
        return []

"""What a run leaves behind: the LoRA adapter encrypted to the recipient's key, the resolved recipe, a summary.

Nothing plaintext derived from the data is written: the adapter bytes exist unencrypted only in memory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from medtee.crypto.blob import seal_blob
from medtee.crypto.hpke import load_public_key, write_keypair
from medtee.files import write_atomic

ADAPTER_FILE = "adapter.safetensors.enc"  # encrypted to the recipient (the model owner)
SEALED_ADAPTER_FILE = "adapter.sealed"  # sealed to this dataset's release: opens only in a later attested run
ADAPTER_INFO = b"medtee/adapter/v1"
MAX_SEALED_ADAPTER_BYTES = 16 << 30  # a LoRA of a 27B model at high rank is a few GB
DEV_RECIPIENT_DIR = Path(".medtee") / "keys"
DEV_RECIPIENT_NAME = "dev-recipient"


def recipient_public_key(spec: str, *, scheme) -> tuple[object, bytes, str]:
    """(scheme, public bytes, description) of the key the adapter is encrypted to."""
    if spec == "dev":
        public = DEV_RECIPIENT_DIR / f"{DEV_RECIPIENT_NAME}.pub"
        if not public.exists():
            write_keypair(DEV_RECIPIENT_DIR, DEV_RECIPIENT_NAME, scheme)
        found_scheme, key = load_public_key(public)
        return found_scheme, key, f"development recipient {public} (private key beside it: NOT for production)"
    found_scheme, key = load_public_key(spec)
    return found_scheme, key, spec


def recipient_problem(spec: str) -> str | None:
    """Why `output.recipient` cannot receive the adapter (checked before the data key is released), or None."""
    from medtee.crypto.hpke import KeyWrapError

    if spec == "dev":
        return None
    try:
        load_public_key(spec)
    except (OSError, KeyWrapError, ValueError) as exc:
        detail = str(exc) if isinstance(exc, KeyWrapError) else f"cannot read it ({type(exc).__name__})"
        return (f"output.recipient={spec}: {detail}; name the model owner's public key file (`medtee keys new` "
                f"writes NAME.pub) or use output.recipient=dev for a development key")
    return None


def write_outputs(peft_model, *, adapter: dict | None, recipient: str | None, scheme, base_model: str, release_key: bytes,
                  summary: dict, recorded_recipe: dict, out_dir: Path) -> dict:
    """Encrypt the adapter (`adapter`: whole tensors named as peft saves them) twice: to `recipient` (a .pub file or
    dev; a new key in `scheme`; None: not released, e.g. a failed memorization audit), and under `release_key` (derived from this dataset's released data key:
    `adapter.sealed`, which a later attested run of the same dataset opens, and nothing else); write its config
    naming `base_model`, unless `adapter` is None (an evaluation run); write the recorded recipe and the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    if adapter is not None:
        written = _write_adapter(peft_model, adapter, recipient=recipient, scheme=scheme, base_model=base_model,
                                 release_key=release_key, out_dir=out_dir)
    write_atomic(out_dir / "recipe.json", json.dumps(recorded_recipe, indent=2, sort_keys=True).encode())
    outputs = {ADAPTER_FILE: written} if written else {}
    write_atomic(out_dir / "summary.json",
                  json.dumps({**summary, "outputs": outputs}, indent=2, sort_keys=True).encode())
    return written


def _write_adapter(peft_model, adapter: dict, *, recipient: str, scheme, base_model: str, release_key: bytes,
                   out_dir: Path) -> dict:
    from safetensors.torch import save

    from medtee.crypto.stream import encrypt

    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter.items()}
    plaintext = save(state)
    del state
    write_atomic(out_dir / SEALED_ADAPTER_FILE, encrypt(plaintext, release_key))
    if recipient is None:
        return {}
    scheme, public, described = recipient_public_key(recipient, scheme=scheme)
    blob = seal_blob(plaintext, public, scheme=scheme, info=ADAPTER_INFO)
    write_atomic(out_dir / ADAPTER_FILE, blob)
    adapter_cfg = peft_model.peft_config["default"].to_dict()
    adapter_cfg["base_model_name_or_path"] = base_model
    adapter_cfg = json.loads(json.dumps(adapter_cfg, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    write_atomic(out_dir / "adapter_config.json", json.dumps(adapter_cfg, indent=2, sort_keys=True).encode())
    return {"adapter_sha256": hashlib.sha256(blob).hexdigest(), "adapter_recipient": described}


def open_sealed_adapter(path: Path, release_key: bytes) -> dict:
    """The adapter tensors of `adapter.sealed`, inside an attested run of the dataset it was trained on; StreamError
    when it was sealed to another dataset's release (or altered)."""
    from safetensors.torch import load

    from medtee.crypto.stream import decrypt
    from medtee.files import read_regular

    return load(decrypt(read_regular(path, MAX_SEALED_ADAPTER_BYTES), release_key, name=str(path)))


def open_adapter(encrypted: Path, private_key_file: Path, out_dir: Path) -> Path:
    """The recipient's step, outside the TEE: decrypt an adapter into a peft-loadable directory."""
    from medtee.crypto.blob import open_blob
    from medtee.crypto.hpke import load_private_key

    _, key = load_private_key(private_key_file)
    weights = open_blob(Path(encrypted).read_bytes(), key, info=ADAPTER_INFO)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "adapter_model.safetensors", weights)
    config_file = Path(encrypted).with_name("adapter_config.json")
    if config_file.exists():
        write_atomic(out_dir / "adapter_config.json", config_file.read_bytes())
    return out_dir

"""What a run leaves behind: the LoRA adapter encrypted to the recipient's key, the resolved recipe, a summary.

Nothing plaintext derived from the data is written: the adapter bytes exist unencrypted only in memory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from typing import NamedTuple

from medtee.crypto.blob import seal_blob
from medtee.crypto.hpke import PublicKeyFile, read_public_key_file, write_keypair
from medtee.files import write_atomic

ADAPTER_FILE = "adapter.safetensors.enc"  # encrypted to the recipient (the model owner)
SEALED_ADAPTER_FILE = "adapter.sealed"  # sealed to this dataset's release: opens only in a later attested run
ADAPTER_INFO = b"medtee/adapter/v1"
SEALED_BLOB_HEADER = b"MTB1"  # how every medtee.crypto.blob.seal_blob output starts (ADAPTER_FILE among them)
MAX_SEALED_ADAPTER_BYTES = 16 << 30  # a LoRA of a 27B model at high rank is a few GB
DEV_RECIPIENT_DIR = Path(".medtee") / "keys"
DEV_RECIPIENT_NAME = "dev-recipient"


class Recipient(NamedTuple):
    """The key the adapter is encrypted to, read once before the key release (the recipe digest hashes its bytes)."""

    key: PublicKeyFile
    described: str


def recipient(spec: str, *, scheme) -> Recipient:
    """`output.recipient` read once: a .pub file, or dev (the development key, created in `scheme` on first use).
    ValueError naming the setting and the fix when it cannot receive the adapter."""
    from medtee.crypto.hpke import KeyWrapError

    if spec == "dev":
        public = DEV_RECIPIENT_DIR / f"{DEV_RECIPIENT_NAME}.pub"
        if not public.exists():
            write_keypair(DEV_RECIPIENT_DIR, DEV_RECIPIENT_NAME, scheme)
        return Recipient(read_public_key_file(public),
                         f"development recipient {public} (private key beside it: NOT for production)")
    try:
        return Recipient(read_public_key_file(spec), spec)
    except (OSError, KeyWrapError, ValueError) as exc:
        detail = str(exc) if isinstance(exc, KeyWrapError) else f"cannot read it ({type(exc).__name__})"
        raise ValueError(f"output.recipient={spec}: {detail}; name the model owner's public key file (`medtee keys "
                         f"new` writes NAME.pub) or use output.recipient=dev for a development key") from None


def write_outputs(peft_model, *, adapter: dict | None, recipient: Recipient | None, base_model: str,
                  release_key: bytes, summary: dict, recorded_recipe: dict, out_dir: Path) -> dict:
    """Encrypt the adapter (`adapter`: whole tensors named as peft saves them) twice: to `recipient` (read before the
    release; None: not released, e.g. a failed memorization audit), and under `release_key` (derived from this dataset's released data key:
    `adapter.sealed`, which a later attested run of the same dataset opens, and nothing else); write its config
    naming `base_model`, unless `adapter` is None (an evaluation run); write the recorded recipe and the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    if adapter is not None:
        written = _write_adapter(peft_model, adapter, recipient=recipient, base_model=base_model,
                                 release_key=release_key, out_dir=out_dir)
    write_atomic(out_dir / "recipe.json", json.dumps(recorded_recipe, indent=2, sort_keys=True).encode())
    outputs = {ADAPTER_FILE: written} if written else {}
    write_atomic(out_dir / "summary.json",
                  json.dumps({**summary, "outputs": outputs}, indent=2, sort_keys=True).encode())
    return written


def _write_adapter(peft_model, adapter: dict, *, recipient: Recipient | None, base_model: str, release_key: bytes,
                   out_dir: Path) -> dict:
    from safetensors.torch import save

    from medtee.crypto.stream import encrypt

    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter.items()}
    plaintext = save(state)
    del state
    write_atomic(out_dir / SEALED_ADAPTER_FILE, encrypt(plaintext, release_key))
    if recipient is None:
        return {}
    blob = seal_blob(plaintext, recipient.key.public, scheme=recipient.key.scheme, info=ADAPTER_INFO)
    write_atomic(out_dir / ADAPTER_FILE, blob)
    adapter_cfg = peft_model.peft_config["default"].to_dict()
    adapter_cfg["base_model_name_or_path"] = base_model
    adapter_cfg = json.loads(json.dumps(adapter_cfg, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    write_atomic(out_dir / "adapter_config.json", json.dumps(adapter_cfg, indent=2, sort_keys=True).encode())
    return {"adapter_sha256": hashlib.sha256(blob).hexdigest(), "adapter_recipient": recipient.described}


def open_sealed_adapter(path: Path, release_key: bytes, *, sha256: str | None = None,
                        earlier: tuple[bytes, ...] = ()) -> dict:
    """The adapter tensors of `adapter.sealed`, inside an attested run of the dataset it was trained on (under
    `release_key`, or one of the `earlier` keys of an earlier derivation); StreamError when it was sealed to another
    dataset's release (or altered), or (`sha256`: the digest the recipe recorded of the file) when the bytes read now
    are another file's."""
    from safetensors.torch import load

    from medtee.crypto.stream import StreamError, decrypt
    from medtee.files import read_regular

    data = read_regular(path, MAX_SEALED_ADAPTER_BYTES)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise StreamError(f"{path} is not the file the recipe digest covers: it was replaced after the run hashed it")
    return load(decrypt(data, release_key, name=str(path), earlier=earlier))


def adapter_file_problem(path: Path) -> str | None:
    """Why `path` is not an adapter encrypted to a recipient (`adapter.safetensors.enc`): a directory, a file sealed to
    a dataset's release (adapter.sealed or a checkpoint) or another file; None when its header is right."""
    from medtee.crypto.stream import MAGIC, MAGIC_V1
    from medtee.files import NotRegularFile, open_regular

    if path.is_dir():
        inside = path / ADAPTER_FILE
        return f"{path} is a directory; name the encrypted adapter " + (
            f"in it: {inside}" if inside.is_file() else f"file ({ADAPTER_FILE} in a run's output directory)")
    try:
        f, _ = open_regular(path)
    except FileNotFoundError:
        return f"{path}: no such file"
    except NotRegularFile as exc:
        return f"{path} {exc}; name a run's {ADAPTER_FILE}"
    with f:
        head = f.read(len(MAGIC))
    if head.startswith((MAGIC, MAGIC_V1)):
        return (f"{path} is sealed to a dataset's release ({SEALED_ADAPTER_FILE} or a checkpoint), not encrypted to "
                f"your key: it opens only in an attested run (`medtee eval run evaluation.adapter=...`); to decrypt "
                f"the adapter, pass {ADAPTER_FILE} from the same run directory")
    if not head.startswith(SEALED_BLOB_HEADER):
        return (f"{path} is not an encrypted adapter (no {SEALED_BLOB_HEADER.decode()} header); pass a run's "
                f"{ADAPTER_FILE}")
    return None


def out_dir_problem(out_dir: Path) -> str | None:
    """Why `out_dir` cannot receive a decrypted adapter: a file, under a file, or a directory that is not empty
    (a decrypted adapter is never overwritten); None when it is absent or empty."""
    if out_dir.exists() and not out_dir.is_dir():
        return f"--out {out_dir} is a file; name a directory (it is created if missing)"
    if any(p.exists() and not p.is_dir() for p in out_dir.parents):
        return f"--out {out_dir}: a parent of it is a file; name a directory"
    held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if held:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        return (f"--out {out_dir} is not empty (it holds {shown}); name a new or empty directory (adapter open never "
                f"overwrites)")
    return None


def open_adapter(encrypted: Path, private_key_file: Path, out_dir: Path) -> Path:
    """The recipient's step, outside the TEE: decrypt an adapter into a peft-loadable directory, new or empty
    (FileExistsError, before anything is decrypted or written, when it already holds an adapter file)."""
    from medtee.crypto.blob import open_blob
    from medtee.crypto.hpke import load_private_key
    from medtee.files import read_regular, write_new

    names = ("adapter_model.safetensors", "adapter_config.json")
    for name in names:
        if (out_dir / name).exists():
            raise FileExistsError(f"{out_dir / name} already exists; a decrypted adapter is never overwritten")
    _, key = load_private_key(private_key_file)
    weights = open_blob(read_regular(encrypted, MAX_SEALED_ADAPTER_BYTES), key, info=ADAPTER_INFO)
    config_file = Path(encrypted).with_name("adapter_config.json")
    config = config_file.read_bytes() if config_file.is_file() else None
    out_dir.mkdir(parents=True, exist_ok=True)
    write_new(out_dir / names[0], weights)
    if config is not None:
        write_new(out_dir / names[1], config)
    return out_dir

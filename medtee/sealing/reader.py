"""The TEE's side: check a sealed dataset's integrity up front, then decrypt its shards into memory only.

Each shard is read into memory, its SHA-256 checked against the signed manifest again (the file may have changed
since :func:`open_dataset`), and decrypted from that buffer; nothing is written anywhere. The canary side file
(`medtee seal --canaries`) is checked the same way and decrypted by :meth:`SealedDataset.canaries`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from medtee.audit.canaries import Canary, decrypt_canaries
from medtee.sealing.pme_keys import decryption_properties
from medtee.sealing.manifest import (
    MANIFEST_NAME,
    CanaryInfo,
    Manifest,
    SealedDataError,
    ShardInfo,
    key_check,
    open_regular,
)

if TYPE_CHECKING:
    import pyarrow as pa
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def _fix(path: Path) -> str:
    return f"the dataset at {path} was altered or copied incompletely; copy it again from the data owner"


def open_dataset(path: Path | str, *, trusted_owner: Ed25519PublicKey | None = None) -> SealedDataset:
    """Load the manifest, verify its signature, and check every shard (presence, size, digest) before any use.

    A missing, extra, renamed, reordered, truncated or altered shard raises SealedDataError naming the shard.
    `trusted_owner` pins the data owner's signing key; without it the embedded key is only checked for consistency
    (the key broker's manifest-digest check authenticates the manifest at key release).
    """
    path = Path(path)
    if not path.is_dir():
        raise SealedDataError(f"{path} is not a directory; point at the directory `medtee seal --out` created")
    manifest = Manifest.load(path)
    manifest.verify_signature(source=str(path / MANIFEST_NAME), trusted=trusted_owner)
    expected = {s.name: "shard" for s in manifest.shards} | ({manifest.canaries.name: "canary file"}
                                                             if manifest.canaries else {})
    present = sorted(p.name for p in path.iterdir() if p.name != MANIFEST_NAME)
    missing = [n for n in expected if n not in present]
    extra = [n for n in present if n not in expected]
    if missing:
        raise SealedDataError(f"{expected[missing[0]]} {missing[0]} listed in the manifest is missing ({len(missing)} "
                              f"missing); {_fix(path)}")
    if extra:
        raise SealedDataError(f"file {extra[0]} is not listed in the manifest ({len(extra)} unexpected); {_fix(path)}")
    for shard in manifest.shards:
        _check_shard_file(path, shard)
    if manifest.canaries is not None:
        _check_shard_file(path, manifest.canaries, kind="canary file")
    return SealedDataset(manifest=manifest, path=path)


@contextmanager
def _shard_file(root: Path, shard: ShardInfo | CanaryInfo, kind: str = "shard") -> Iterator[BinaryIO]:
    """The shard's (or canary file's) file, open, if it is a regular file of the size the manifest says; a read
    error as SealedDataError."""
    try:
        f, size = open_regular(root / shard.name, f"{kind} {shard.name}", _fix(root))
    except FileNotFoundError:
        raise SealedDataError(f"{kind} {shard.name} listed in the manifest is missing; {_fix(root)}") from None
    with f:
        if size != shard.bytes:
            how = "truncated" if size < shard.bytes else "extended"
            raise SealedDataError(
                f"{kind} {shard.name} has {size} bytes, the manifest says {shard.bytes} ({how} or swapped); "
                f"{_fix(root)}"
            )
        try:
            yield f
        except OSError as e:
            raise SealedDataError(f"{kind} {shard.name} cannot be read ({e.strerror}); {_fix(root)}") from None


def _check_shard_file(root: Path, shard: ShardInfo | CanaryInfo, kind: str = "shard") -> None:
    with _shard_file(root, shard, kind) as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != shard.sha256:
        raise SealedDataError(f"{kind} {shard.name} does not match its manifest digest (altered or swapped); "
                              f"{_fix(root)}")


@dataclass(frozen=True)
class SealedDataset:
    """A sealed dataset whose manifest and shards passed the integrity checks."""

    manifest: Manifest
    path: Path

    def check_key(self, data_key: bytes) -> None:
        """Raise SealedDataError unless `data_key` is this dataset's key."""
        if not isinstance(data_key, (bytes, bytearray)) or not hmac.compare_digest(
            key_check(bytes(data_key), self.manifest.dataset_id), self.manifest.key_check
        ):
            raise SealedDataError(
                f"the data key does not belong to dataset {self.manifest.dataset_id} ({self.path}); "
                "request it from the broker that registered this dataset"
            )

    def _open_shard(self, shard: ShardInfo, data_key: bytes):
        import pyarrow as pa
        import pyarrow.parquet as pq

        with _shard_file(self.path, shard) as f:
            data = f.read(shard.bytes + 1)
        if len(data) != shard.bytes or hashlib.sha256(data).hexdigest() != shard.sha256:
            raise SealedDataError(f"shard {shard.name} changed after the dataset was opened; {_fix(self.path)}")
        try:
            pf = pq.ParquetFile(pa.BufferReader(data), decryption_properties=decryption_properties(data_key))
        except Exception as e:  # pyarrow raises OSError/ArrowException types; their text names no record content
            raise SealedDataError(f"shard {shard.name} cannot be decrypted ({type(e).__name__}); {_fix(self.path)}") from None
        if pf.metadata.num_rows != shard.rows:
            raise SealedDataError(f"shard {shard.name} holds {pf.metadata.num_rows} rows, manifest says {shard.rows}")
        return pf

    def iter_batches(self, data_key: bytes, batch_rows: int = 1024) -> Iterator[pa.RecordBatch]:
        """Decrypted record batches (columns id, messages) in manifest order; batches do not span shards."""
        self.check_key(data_key)
        if batch_rows < 1:
            raise ValueError("batch_rows must be positive")
        for shard in self.manifest.shards:
            pf = self._open_shard(shard, data_key)
            try:
                yield from pf.iter_batches(batch_size=batch_rows, columns=["id", "messages"])
            except Exception as e:
                raise SealedDataError(
                    f"shard {shard.name} failed authenticated decryption ({type(e).__name__}); {_fix(self.path)}"
                ) from None

    def read_records(self, data_key: bytes) -> list[dict]:
        """All records as `{"id", "messages": [{"role", "content"}]}` dicts, in memory."""
        return [rec for batch in self.iter_batches(data_key, batch_rows=8192) for rec in batch.to_pylist()]

    def canaries(self, data_key: bytes) -> list[Canary]:
        """The dataset's canaries, decrypted in memory: the inserted ones (`repeats` > 0) and the never-inserted
        controls (`repeats` == 0); [] for a dataset sealed without canaries."""
        self.check_key(data_key)
        info = self.manifest.canaries
        if info is None:
            return []
        with _shard_file(self.path, info, "canary file") as f:
            blob = f.read(info.bytes + 1)
        if len(blob) != info.bytes or hashlib.sha256(blob).hexdigest() != info.sha256:
            raise SealedDataError(f"canary file {info.name} changed after the dataset was opened; {_fix(self.path)}")
        try:
            canaries = decrypt_canaries(blob, bytes(data_key), self.manifest.dataset_id)
        except ValueError as e:
            raise SealedDataError(f"canary file {info.name}: {e}; {_fix(self.path)}") from None
        counts = (sum(c.repeats > 0 for c in canaries), sum(c.repeats == 0 for c in canaries))
        if counts != (info.inserted, info.controls):
            raise SealedDataError(f"canary file {info.name} does not hold the canaries the manifest counts; "
                                  f"{_fix(self.path)}")
        return canaries

    def __repr__(self) -> str:
        m = self.manifest
        return f"SealedDataset(dataset_id={m.dataset_id!r}, records={m.record_count}, shards={len(m.shards)}, path={str(self.path)!r})"


def read_pme_table(path: Path | str, *, kms_client_factory, kms_connection_config=None, columns=None) -> pa.Table:
    """Read a Parquet file encrypted by another Parquet Modular Encryption writer (Spark, parquet-mr, pyarrow).

    `kms_client_factory(kms_connection_config) -> pyarrow.parquet.encryption.KmsClient` must reach the master keys
    the writer used. Internal and external key material are both handled (external: the `_KEY_MATERIAL_FOR_*.json`
    file beside the Parquet file, as parquet-mr writes it).
    """
    import pyarrow.parquet as pq

    path = Path(path)
    props = decryption_properties(
        kms_client_factory=kms_client_factory, kms_connection_config=kms_connection_config, parquet_file_path=str(path)
    )
    try:
        return pq.read_table(path, decryption_properties=props, columns=columns)
    except Exception as e:
        raise SealedDataError(f"{path} cannot be decrypted with the configured KMS ({type(e).__name__}: check the "
                              "KMS client reaches the writer's master keys and any external key-material file)") from None

"""Key broker: releases a dataset's data key only to a TEE whose evidence satisfies the dataset's release policy.

Protocol (challenge-response, as in Confidential Containers' KBS): the TEE asks for a nonce for a dataset, makes an
ephemeral key pair in encrypted memory, collects evidence whose REPORT_DATA binds nonce, ephemeral public key,
recipe digest and GPU evidence digests (`medtee.attestation.report_data`), and asks for release. The broker consumes
the nonce (single use, expiring), checks the manifest digest against the registered one, appraises the evidence with
the dataset's current policy, and answers with the data key HPKE-wrapped to the ephemeral key, or a denial listing
the failed checks. Every decision is appended to the hash-chained audit log.

Other key managers (a cloud KMS, HashiCorp Vault, a Confidential Containers key broker) can stand behind the same
:class:`KeyBroker` contract: they hold the broker private key (or the data keys), keep registrations, and must
perform the same release checks before returning `wrap(data_key, ephemeral_public_key, info=release_info(...))`.

Store directory of an :class:`EmbeddedBroker` (created on first use):
`broker.key` (0600) / `broker.pub`: the HPKE key data keys are wrapped to; `owner-signing.key` / `.pub`: the data
owner's manifest-signing key; `trusted-owners/*.pub`: further owner keys whose manifests may be registered;
`datasets/<id>.json`: registrations (manifest + current policy; edit the policy with `medtee broker policy`, read
at every release, no restart); `retired/`: broker keys replaced by rotation; `audit.log`: the audit chain.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from medtee.files import write_atomic
from medtee.sealing import keywrap
from medtee.sealing.audit import AuditLog
from medtee.sealing.keywrap import DEFAULT_SCHEME, EphemeralKey, Scheme
from medtee.sealing.manifest import Manifest, SealedDataError, data_key_info
from medtee.sealing.owner import load_or_create_signing_key, load_public
from medtee.sealing.seal import check_dataset_id

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from medtee.attestation.evidence import Evidence
    from medtee.attestation.verdict import Verdict

NONCE_BYTES = 32
DEFAULT_NONCE_TTL_S = 120.0
MAX_OUTSTANDING_NONCES = 10_000
BROKER_KEY_NAME = "broker"


class KeyReleaseDenied(Exception):
    """The broker refused to release a key; `verdict` holds every check, the message lists the failed ones."""

    def __init__(self, verdict: Verdict, dataset_id: str = "") -> None:
        self.verdict = verdict
        self.dataset_id = dataset_id
        super().__init__(f"key release for dataset '{dataset_id}' denied:\n{verdict.explain()}")


class UnknownDatasetError(LookupError):
    """The broker has no registration for this dataset id."""


def release_info(dataset_id: str, nonce: bytes) -> bytes:
    """HPKE info of a released data key: binds it to the dataset and the challenge it answers."""
    return b"medtee/release/v1\0" + dataset_id.encode("utf-8") + b"\0" + bytes(nonce)


@runtime_checkable
class KeyBroker(Protocol):
    """What sealing and the TEE's key-release step need from a key broker (embedded, HTTP, or another KMS)."""

    def public_key(self) -> tuple[Scheme, bytes]:
        """Scheme and raw public key that data keys are wrapped to."""

    def register(self, manifest: Manifest) -> None:
        """Accept a signed manifest (the dataset id, digest, wrapped key and release policy)."""

    def challenge(self, dataset_id: str) -> bytes:
        """A fresh single-use nonce for a release of `dataset_id`; it expires."""

    def release(self, *, dataset_id: str, nonce: bytes, evidence: Evidence, ephemeral_public_key: bytes,
                recipe_digest: str, manifest_digest: str) -> bytes:
        """The data key wrapped to `ephemeral_public_key` (info `release_info`), or KeyReleaseDenied."""


def _write_registration(path: Path, manifest: Manifest, policy: str) -> None:
    doc = {"manifest": json.loads(manifest.to_json()), "policy": policy}
    write_atomic(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def _denial(name: str, expected: str, actual: str, policy: str) -> Verdict:
    from medtee.attestation.verdict import Verdict, check

    return Verdict.of([check(name, False, expected, actual)], simulated=False, policy=policy)


class EmbeddedBroker:
    """The in-process broker: its keys, registrations and audit log live in `store_dir` (see module docstring)."""

    def __init__(self, store_dir: Path | str, *, scheme: Scheme | str = DEFAULT_SCHEME,
                 nonce_ttl_s: float = DEFAULT_NONCE_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.store_dir = Path(store_dir)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.store_dir, 0o700)
        (self.store_dir / "datasets").mkdir(exist_ok=True)
        if not (self.store_dir / f"{BROKER_KEY_NAME}.key").exists():
            keywrap.write_keypair(self.store_dir, BROKER_KEY_NAME, Scheme.parse(scheme))
        self._scheme, self._key = keywrap.load_private_key(self.store_dir / f"{BROKER_KEY_NAME}.key")
        self.audit = AuditLog(self.store_dir / "audit.log")
        self.nonce_ttl_s = nonce_ttl_s
        self._clock = clock
        self._nonces: dict[bytes, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._policies: dict[str, tuple[tuple, object]] = {}

    # -- data owner's side -------------------------------------------------------------------------------------------
    def public_key(self) -> tuple[Scheme, bytes]:
        return self._scheme, self._key.public_bytes

    def owner_signing_key(self) -> Ed25519PrivateKey:
        """The data owner's manifest-signing key kept in this store (created on first use)."""
        return load_or_create_signing_key(self.store_dir)

    def trusted_owner_keys(self) -> list[bytes]:
        """Raw Ed25519 public keys whose manifests this broker registers."""
        keys = [self.owner_signing_key().public_key().public_bytes_raw()]
        keys += [load_public(p).public_bytes_raw() for p in sorted((self.store_dir / "trusted-owners").glob("*.pub"))]
        return keys

    def register(self, manifest: Manifest) -> None:
        """Register a dataset; the manifest must be signed by a trusted owner and wrapped to this broker's key."""
        check_dataset_id(manifest.dataset_id)
        manifest.verify_signature(source=f"manifest of dataset {manifest.dataset_id}")
        if manifest.owner_public_key not in self.trusted_owner_keys():
            raise PermissionError(
                f"manifest of dataset {manifest.dataset_id} is signed by owner key {manifest.owner_key_id()}, which this "
                f"broker does not trust; copy that owner's owner-signing.pub into {self.store_dir / 'trusted-owners'}"
            )
        if manifest.key_id != self._key.key_id:
            raise ValueError(
                f"dataset {manifest.dataset_id}: data key is wrapped to broker key {manifest.key_id}, this broker's key is "
                f"{self._key.key_id}; seal against this broker or rotate"
            )
        path = self._registration_path(manifest.dataset_id)
        if path.exists() and self._load_registration(manifest.dataset_id)[0].key_check != manifest.key_check:
            raise FileExistsError(f"dataset id {manifest.dataset_id} is already registered for other data; pick another id")
        _write_registration(path, manifest, manifest.release_policy)
        self.audit.append("register", dataset_id=manifest.dataset_id, manifest_digest=manifest.digest(),
                          policy=manifest.release_policy, owner_key=manifest.owner_key_id())

    def set_policy(self, dataset_id: str, policy: str) -> None:
        """Change a dataset's release policy; effective at the next release (no restart)."""
        from medtee.attestation import load_policy

        load_policy(policy)  # refuse a name that does not load
        manifest, _ = self._load_registration(dataset_id)
        _write_registration(self._registration_path(dataset_id), manifest, policy)
        self.audit.append("policy", dataset_id=dataset_id, policy=policy)

    def datasets(self) -> list[str]:
        """Registered dataset ids."""
        return sorted(p.stem for p in (self.store_dir / "datasets").glob("*.json"))

    def unwrap_data_key(self, manifest: Manifest) -> bytes:
        """The plain data key of a manifest wrapped to this broker (data-owner-only: rotation, benchmarks)."""
        return keywrap.unwrap(manifest.wrapped_data_key, self._key, scheme=Scheme.parse(manifest.scheme),
                              info=data_key_info(manifest.dataset_id))

    def _registration_path(self, dataset_id: str) -> Path:
        return self.store_dir / "datasets" / f"{check_dataset_id(dataset_id)}.json"

    def _load_registration(self, dataset_id: str) -> tuple[Manifest, str]:
        path = self._registration_path(dataset_id)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UnknownDatasetError(
                f"dataset {dataset_id} is not registered with the broker at {self.store_dir}; seal it against this broker"
            ) from None
        except ValueError:
            raise SealedDataError(f"{path} is not valid JSON; restore it or re-register the dataset") from None
        return Manifest.from_json(json.dumps(doc["manifest"]), source=str(path)), doc["policy"]

    def _policy(self, name: str):
        """The attestation policy `name`, re-read whenever its file changes (policy edits need no restart)."""
        from medtee.attestation import load_policy
        from medtee.paths import conf_dir

        try:
            st = (conf_dir() / "attestation" / f"{name}.yaml").stat()
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except (OSError, ValueError):
            return load_policy(name)  # raises the attestation package's own explanation
        cached = self._policies.get(name)
        if cached is None or cached[0] != stamp:
            cached = (stamp, load_policy(name))
            self._policies[name] = cached
        return cached[1]

    # -- the TEE's side ----------------------------------------------------------------------------------------------
    def challenge(self, dataset_id: str) -> bytes:
        self._load_registration(dataset_id)  # unknown datasets get no nonce
        nonce = secrets.token_bytes(NONCE_BYTES)
        now = self._clock()
        with self._lock:
            if len(self._nonces) >= MAX_OUTSTANDING_NONCES:
                self._nonces = {n: v for n, v in self._nonces.items() if v[1] > now}
                if len(self._nonces) >= MAX_OUTSTANDING_NONCES:
                    raise RuntimeError("too many outstanding key-release challenges; retry shortly")
            self._nonces[nonce] = (dataset_id, now + self.nonce_ttl_s)
        return nonce

    def _consume_nonce(self, dataset_id: str, nonce: bytes) -> str | None:
        """None if the nonce is valid (and now spent), else why not."""
        with self._lock:
            entry = self._nonces.pop(bytes(nonce), None)
        if entry is None:
            return "unknown or already used"
        if entry[0] != dataset_id:
            return "issued for another dataset"
        if self._clock() > entry[1]:
            return "expired"
        return None

    def release(self, *, dataset_id: str, nonce: bytes, evidence: Evidence, ephemeral_public_key: bytes,
                recipe_digest: str, manifest_digest: str) -> bytes:
        from medtee.attestation import appraise, report_data

        manifest, policy_name = self._load_registration(dataset_id)
        audit = {"dataset_id": dataset_id, "policy": policy_name, "recipe_digest": recipe_digest,
                 "manifest_digest": manifest_digest, "nonce": bytes(nonce).hex()[:16]}

        def deny(verdict: Verdict) -> KeyReleaseDenied:
            self.audit.append("deny", **audit, failed=[c.name for c in verdict.failures()])
            return KeyReleaseDenied(verdict, dataset_id)

        problem = self._consume_nonce(dataset_id, nonce)
        if problem:
            raise deny(_denial("broker.nonce", "a fresh nonce this broker issued for this dataset", problem, policy_name))
        if manifest_digest != manifest.digest():
            raise deny(_denial("broker.manifest_digest", manifest.digest(), manifest_digest, policy_name))
        try:
            eph_scheme = Scheme.for_public_key(bytes(ephemeral_public_key))
            expected = report_data(nonce=nonce, ephemeral_public_key=ephemeral_public_key, recipe_digest=recipe_digest,
                                   gpu_evidence_digests=evidence.gpu_evidence_digests())
        except ValueError as e:
            raise deny(_denial("broker.request", "a well-formed release request", str(e), policy_name)) from None
        audit["evidence"] = evidence.digest()
        verdict = appraise(evidence, self._policy(policy_name), expected_report_data=expected)
        if not verdict.ok:
            raise deny(verdict)
        wrapped = keywrap.wrap(self.unwrap_data_key(manifest), ephemeral_public_key, scheme=eph_scheme,
                               info=release_info(dataset_id, nonce))
        self.audit.append("release", **audit, simulated=verdict.simulated,
                          ephemeral_key=keywrap.key_id(eph_scheme, bytes(ephemeral_public_key)))
        return wrapped


def rotate(store_dir: Path | str, dataset_dirs: list[Path] = (), *, scheme: Scheme | str | None = None) -> list[Manifest]:
    """Replace the broker key of `store_dir` and re-wrap every registered data key to the new one.

    The shards are untouched (the data keys do not change); manifests are re-signed by the owner key in the store,
    re-registered, and written into each of `dataset_dirs` (whose datasets must be registered here). The old
    private key moves to `retired/`. Run it while no `medtee broker serve` uses the store. Returns the new manifests.
    """
    store_dir = Path(store_dir)
    old = EmbeddedBroker(store_dir)
    new_scheme = Scheme.parse(scheme) if scheme else old.public_key()[0]
    by_id = {Manifest.load(d).dataset_id: Path(d) for d in dataset_dirs}
    unknown = sorted(set(by_id) - set(old.datasets()))
    if unknown:
        raise UnknownDatasetError(f"dataset(s) {', '.join(unknown)} are not registered with the broker at {store_dir}")
    staging = store_dir / "rotating"
    if staging.exists():
        raise FileExistsError(f"{staging} exists: an earlier rotation was interrupted; inspect it, then remove it")
    _, new_pub = keywrap.load_public_key(keywrap.write_keypair(staging, BROKER_KEY_NAME, new_scheme))
    owner = old.owner_signing_key()
    rotated = []
    for dataset_id in old.datasets():
        manifest, policy = old._load_registration(dataset_id)
        rotated.append((replace(
            manifest, scheme=new_scheme.value, key_id=keywrap.key_id(new_scheme, new_pub),
            wrapped_data_key=keywrap.wrap(old.unwrap_data_key(manifest), new_pub, scheme=new_scheme,
                                          info=data_key_info(dataset_id)),
        ).signed(owner), policy))
    retired = store_dir / "retired"
    retired.mkdir(exist_ok=True)
    old_id = old._key.key_id
    for suffix in ("key", "pub"):
        os.replace(store_dir / f"{BROKER_KEY_NAME}.{suffix}", retired / f"{BROKER_KEY_NAME}-{old_id}.{suffix}")
        os.replace(staging / f"{BROKER_KEY_NAME}.{suffix}", store_dir / f"{BROKER_KEY_NAME}.{suffix}")
    staging.rmdir()
    new = EmbeddedBroker(store_dir)
    for manifest, policy in rotated:
        _write_registration(new._registration_path(manifest.dataset_id), manifest, policy)
        if manifest.dataset_id in by_id:
            write_atomic(by_id[manifest.dataset_id] / "manifest.json", manifest.to_json().encode())
    new.audit.append("rotate", old_key=old_id, new_key=new._key.key_id, datasets=[m.dataset_id for m, _ in rotated])
    return [m for m, _ in rotated]


def obtain_data_key(broker: KeyBroker, *, dataset_id: str, manifest_digest: str, recipe_digest: str,
                    evidence_for: Callable[[bytes, bytes], Evidence], scheme: Scheme | str = DEFAULT_SCHEME) -> bytes:
    """The TEE's half of key release: challenge, ephemeral key, evidence, release, unwrap.

    `evidence_for(nonce, ephemeral_public_key) -> Evidence` collects evidence whose REPORT_DATA is
    `medtee.attestation.report_data(nonce=..., ephemeral_public_key=..., recipe_digest=recipe_digest,
    gpu_evidence_digests=...)`. The ephemeral private key never leaves this function.
    """
    nonce = broker.challenge(dataset_id)
    key = EphemeralKey.generate(scheme)
    evidence = evidence_for(nonce, key.public_bytes)
    blob = broker.release(dataset_id=dataset_id, nonce=nonce, evidence=evidence, ephemeral_public_key=key.public_bytes,
                          recipe_digest=recipe_digest, manifest_digest=manifest_digest)
    return key.unwrap(blob, info=release_info(dataset_id, nonce))


def connect(spec: str, *, store_dir: Path | str, ca: str = "", timeout_s: float = 30.0) -> KeyBroker:
    """`"embedded"` -> EmbeddedBroker(store_dir); `"http(s)://host:port"` -> a client of `medtee broker serve`.

    For the HTTP client, `store_dir` holds the data owner's signing key used when sealing against the remote broker,
    `ca` a PEM bundle to verify an https:// broker ("" = system trust store), `timeout_s` the per-request timeout.
    """
    if spec == "embedded":
        return EmbeddedBroker(store_dir)
    if spec.startswith(("http://", "https://")):
        from medtee.sealing.http_broker import HttpBroker

        return HttpBroker(spec, store_dir=store_dir, ca=ca, timeout_s=timeout_s)
    raise ValueError(f"broker {spec!r} is neither 'embedded' nor an http(s):// URL; fix encryption.broker or --broker")

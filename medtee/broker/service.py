"""The data owner's key broker service (EmbeddedBroker).

Store directory of an :class:`EmbeddedBroker` (created on first use, mode 0700):
`broker.key` (0600) / `broker.pub`: the HPKE key data keys are wrapped to; `owner-signing.key` / `.pub`: the data
owner's manifest-signing key; `trusted-owners/*.pub`: further owner keys whose manifests may be registered;
`datasets/<id>.json`: registrations (manifest + current policy; change it with `medtee broker policy set`, read
at every release, no restart); `policies/NAME.yaml`: the owner's own release policies (`medtee broker policy add`),
looked up before the shipped ones; `retired/`: broker keys replaced by rotation; `store.lock`, held shared by every
broker on the store, and `rotating/`, an unfinished rotation (`medtee.broker.store`); `audit.log`: the audit chain, and
`audit.log.mark` its high-water mark (`medtee.broker.audit`); `revocation-seen.json`: the newest AMD CRL and NVIDIA
OCSP answer appraisal accepted, and every revocation (`medtee.attestation.freshness`: no older copy counts after
it, and no revocation is undone).

Outstanding challenges are capped per dataset and per client (the HTTP service passes the remote address), so a
flood for one dataset or from one client cannot starve another; expired nonces are pruned at every challenge and
release. Audit entries hold ids, digests, check names and the client address: a client-supplied string is written
only once it has passed validation, anything else as the fixed marker `INVALID`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from medtee.attestation.freshness import Newest
from medtee.broker import budget
from medtee.broker import store as disk
from medtee.broker.audit import AuditLog
from medtee.broker.store import BROKER_KEY_NAME
from medtee.broker.protocol import (
    DEFAULT_NONCE_TTL_S,
    NONCE_BYTES,
    ChallengeRefused,
    KeyReleaseDenied,
    RequestError,
    UnknownDatasetError,
    check_digest,
    release_info,
)
from medtee.crypto import hpke
from medtee.crypto.hpke import DEFAULT_SCHEME, Scheme
from medtee.crypto.signing import load_or_create_signing_key, load_public
from medtee.files import write_atomic
from medtee.sealing.manifest import Manifest, SealedDataError, data_key_info

log = logging.getLogger("medtee.broker")

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from medtee.attestation.evidence import Evidence
    from medtee.attestation.policy import AttestationPolicy, DpBudget
    from medtee.attestation.verdict import Verdict
    from medtee.broker.protocol import ReleaseRecord

DEFAULT_MAX_CHALLENGES_PER_DATASET = 1024
DEFAULT_MAX_CHALLENGES_PER_CLIENT = 256
MAX_COUNTED_CLIENTS = 10_000  # clients whose unaudited requests are counted (then the count restarts)
MAX_REMEMBERED_NONCES = 65_536  # spent or expired nonces (their SHA-256) told apart from ones never issued
NEVER_ISSUED = "never issued by this broker"
FRESH_NONCE = "a fresh nonce this broker issued for this dataset"
LOCAL_CLIENT = "local"  # the client of in-process calls
INVALID = "(invalid)"  # audited in place of a field that failed validation


def _denial(name: str, expected: str, actual: str, policy: str) -> Verdict:
    from medtee.attestation.verdict import Verdict, check

    return Verdict.of([check(name, False, expected, actual)], simulated=False, policy=policy)


def _audit_fields(dataset_id: str, policy: str, client: str, fields: dict) -> dict:
    """What a release decision records: validated values, INVALID for the rest, a 16-hex-digit nonce prefix."""
    def digest(name: str) -> str:
        try:
            return check_digest(fields.get(name), name)
        except RequestError:
            return INVALID

    nonce = fields.get("nonce")
    return {"dataset_id": dataset_id, "policy": policy, "client": client, "recipe_digest": digest("recipe_digest"),
            "manifest_digest": digest("manifest_digest"),
            "nonce": bytes(nonce).hex()[:16] if isinstance(nonce, (bytes, bytearray)) else INVALID}


class _Decisions:
    """The audit log as release decisions look it up (its AuditIndex): each release's dataset and receipt key, each
    release's close, each dataset's privacy spent."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.releases: dict[object, dict] = {}  # release id (the entry's hash) -> dataset_id, receipt_key, target
        self.closes: dict[object, dict] = {}  # release id -> its close entry's event, hash, record_sha256
        self.spent: dict[object, budget.Tally] = {}  # dataset id -> what its releases spent
        self.newest: dict[object, object] = {}  # checkpoint SHA-256 -> release whose close reported it, no adapter
        self.continued: set = set()  # releases a free resume continues

    def add(self, entry: dict) -> None:
        event = entry.get("event")
        if event == "release":
            self.releases[entry.get("hash")] = {**{k: entry.get(k) for k in ("dataset_id", "receipt_key")},
                                                "target": entry.get("dp_target", entry.get("dp_spend"))}
            self.spent.setdefault(entry.get("dataset_id"), budget.Tally()).add(entry)
            if isinstance(entry.get("resumes"), str):
                self.continued.add(entry["resumes"])
        elif event == "close":
            self.closes[entry.get("release_id")] = {k: entry.get(k) for k in ("event", "hash", "record_sha256")}
            outputs = budget.close_outputs(entry.get("outputs"))
            if outputs and not outputs["adapter"] and outputs["last_checkpoint"]:
                self.newest[outputs["last_checkpoint"]] = entry.get("release_id")

    def tally(self, dataset_id: str) -> budget.Tally:
        return self.spent.get(dataset_id) or budget.Tally()


class EmbeddedBroker:
    """The owner's broker: keys, registrations and audit log live in `store_dir` (see the module docstring)."""

    def __init__(self, store_dir: Path | str, *, scheme: Scheme | str = DEFAULT_SCHEME,
                 nonce_ttl_s: float = DEFAULT_NONCE_TTL_S,
                 max_challenges_per_dataset: int = DEFAULT_MAX_CHALLENGES_PER_DATASET,
                 max_challenges_per_client: int = DEFAULT_MAX_CHALLENGES_PER_CLIENT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store_dir = Path(store_dir)
        scheme = Scheme.parse(scheme)
        try:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.store_dir, 0o700)
            (self.store_dir / "datasets").mkdir(exist_ok=True)
            self._hold = disk.hold(self.store_dir, scheme)  # shared for its life: no rotation under it
        except disk.RotationInterrupted as e:
            raise disk.StoreError(str(e)) from None
        except OSError as e:
            raise disk.unusable(self.store_dir, e) from None
        try:
            self._scheme, self._key = hpke.load_private_key(self.store_dir / f"{BROKER_KEY_NAME}.key")
            self._newest = Newest(self.store_dir / "revocation-seen.json")  # rollback of cached CRLs / OCSP answers
            self._decisions = _Decisions()
            self.audit = AuditLog(self.store_dir / "audit.log", self._decisions)
            self.audit.check_mark()  # a log behind its mark: refused before any work that would record something
        except BaseException:
            self._hold.close()
            raise
        self.nonce_ttl_s = nonce_ttl_s
        self.max_challenges_per_dataset = max_challenges_per_dataset
        self.max_challenges_per_client = max_challenges_per_client
        self._clock = clock
        self._nonces: OrderedDict[bytes, tuple[str, str, float]] = OrderedDict()  # issue order = expiry order
        self._per_dataset: Counter[str] = Counter()
        self._per_client: Counter[str] = Counter()
        self._unaudited: Counter[tuple[str, str]] = Counter()  # (what, client): requests naming nothing issued
        self._gone: OrderedDict[bytes, None] = OrderedDict()  # SHA-256 of the latest spent or expired nonces
        self._lock = threading.Lock()
        self._policies: dict[str, tuple[str, object]] = {}

    def close(self) -> None:
        """Let go of the store (its shared lock), e.g. before `rotate` in this process; the broker is unusable after."""
        self._hold.close()

    def __enter__(self) -> EmbeddedBroker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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

    def register(self, manifest: Manifest, *, policy_sha256: str | None = None) -> None:
        """Register a dataset; the manifest must be signed by a trusted owner and wrapped to this broker's key.

        A registered dataset id takes no other manifest, and registering the same manifest again changes nothing:
        its release policy changes only through `set_policy` (the sealed directory's manifest, which the training host
        holds, must not reset a policy the owner tightened; another trusted owner must not take over the dataset).

        `policy_sha256`: the digest of the policy file its sealer checked; the registration is refused unless the
        file the broker reads the release policy from still holds exactly that (checked and written under the audit
        log's lock, as policies are stored: no seal registers under a policy changed or removed meanwhile). A
        refused registration naming an already registered dataset is audited (`refuse-register`)."""

        path = self._registration_path(manifest.dataset_id)
        name = manifest.release_policy

        def decide() -> tuple[str, dict] | dict:
            if self._check_registration(manifest, path):  # under the lock: two seals of one dataset id register once
                return {}  # this very manifest is registered already: nothing changes (a retried request)
            _, held = self._release_policy(name)
            if policy_sha256 is not None and held != policy_sha256:
                    raise ValueError(f"release policy '{name}' was changed or removed while the dataset was sealed, "
                                     f"so it is not the policy that was checked; nothing was registered: seal again")
            disk.write_registration(path, manifest, name)
            return "register", {"dataset_id": manifest.dataset_id, "manifest_digest": manifest.digest(),
                                "policy": name, "policy_sha256": held, "owner_key": manifest.owner_key_id()}

        try:
            self.audit.append_decided(decide)
        except (PermissionError, ValueError, FileExistsError) as e:
            self._refused_registration(manifest.dataset_id, e, manifest.owner_key_id())
            raise

    def register_json(self, doc: object) -> Manifest:
        """Register the manifest of a registration request's JSON (as `register`, malformed ones audited too)."""
        try:
            manifest = Manifest.from_json(json.dumps(doc), source="registration request")
        except SealedDataError as e:
            self._refused_registration(doc.get("dataset_id") if isinstance(doc, dict) else None, e, INVALID)
            raise
        self.register(manifest)
        return manifest

    def _refused_registration(self, dataset_id: object, error: Exception, owner_key: str) -> None:
        try:
            known = self._registration_path(dataset_id).exists()
        except ValueError:  # not a dataset id
            return
        if known:
            self.audit.append("refuse-register", dataset_id=dataset_id, reason=type(error).__name__, owner_key=owner_key)

    def _check_registration(self, manifest: Manifest, path: Path) -> bool:
        """Whether exactly this manifest is registered already; raises if it may not be registered."""
        manifest.verify_signature(source=f"manifest of dataset {manifest.dataset_id}")
        if manifest.owner_public_key not in self.trusted_owner_keys():
            raise PermissionError(
                f"manifest of dataset {manifest.dataset_id} is signed by owner key {manifest.owner_key_id()}, which this "
                f"broker does not trust; the broker's operator copies that owner's owner-signing.pub into the "
                f"trusted-owners/ directory of its store"
            )
        if manifest.key_id != self._key.key_id:
            raise ValueError(
                f"dataset {manifest.dataset_id}: data key is wrapped to broker key {manifest.key_id}, this broker's key is "
                f"{self._key.key_id}; seal against this broker or rotate"
            )
        if not path.exists():
            return False
        held = self._load_registration(manifest.dataset_id)[0]
        if held.digest() == manifest.digest():
            return True
        if held.key_check != manifest.key_check:
            raise FileExistsError(f"dataset id {manifest.dataset_id} is already registered for other data; pick another id")
        raise FileExistsError(
            f"dataset {manifest.dataset_id} is already registered with another manifest (digest {held.digest()[:16]}), "
            f"which a registration cannot replace; to change its release policy run `medtee broker policy set "
            f"{manifest.dataset_id} NAME` on the broker's host")

    def set_policy(self, dataset_id: str, policy: str) -> None:
        """Change a dataset's release policy (a store or shipped name); effective at the next release (no restart)."""
        _, digest = self._release_policy(policy)  # refuse a name that does not load, or releases nothing
        manifest, _ = self._load_registration(dataset_id)

        def decide():  # under the log's lock, once it is known to record: never a change it does not hold
            disk.write_registration(self._registration_path(dataset_id), manifest, policy)
            return "policy", {"dataset_id": dataset_id, "policy": policy, "policy_sha256": digest}

        self.audit.append_decided(decide)

    def privacy_spent(self, dataset_id: str) -> tuple[str, DpBudget | None, budget.Tally]:
        """(policy name, its `recipe.dp_budget` or None when the policy cannot be read, what the dataset's releases
        have spent) from the audit log."""
        _, name = self._load_registration(dataset_id)
        try:
            limit = self._policy(name)[0].recipe.dp_budget
        except ValueError:
            limit = None
        return name, limit, budget.spent(self.audit.entries(), dataset_id)

    def datasets(self) -> list[str]:
        """Registered dataset ids."""
        return disk.datasets(self.store_dir)

    def unwrap_data_key(self, manifest: Manifest) -> bytes:
        """The plain data key of a manifest wrapped to this broker (data-owner-only: rotation, benchmarks)."""
        return hpke.unwrap(manifest.wrapped_data_key, self._key, scheme=Scheme.parse(manifest.scheme),
                              info=data_key_info(manifest.dataset_id))

    def _registration_path(self, dataset_id: str) -> Path:
        return disk.registration_path(self.store_dir, dataset_id)

    def _load_registration(self, dataset_id: str) -> tuple[Manifest, str]:
        return disk.read_registration(self.store_dir, dataset_id)

    # -- the data owner's policy store: policies/NAME.yaml, read before the shipped conf/attestation/NAME.yaml -------
    MAX_POLICY_BYTES = 64 << 10  # of a policy file the store accepts

    def add_policy(self, name: str, source: Path | str, *,
                   vet: Callable[[AttestationPolicy, str], list[str]] | None = None) -> str:
        """Validate the policy file `source` as shipped ones are validated (and by `vet(policy, source)`, which lists
        further problems) and store it as `policies/<name>.yaml` (atomic, audited `policy-add`; the owner's verb: it
        replaces a stored policy of that name, auditing the digest it replaced); returns the SHA-256 of the stored
        bytes."""
        return self._store_policy(name, self._read_policy_file(Path(source)), str(source), replace=True, vet=vet)[0]

    def claim_policy(self, name: str, data: bytes, source: str) -> bool:
        """Store the policy bytes `data` as `name` unless the store holds exactly them already (False); ValueError
        when it holds another policy of that name, which is never replaced (datasets sealed under it rely on it).
        Checked and written under the audit log's lock: two seals cannot both claim one name."""
        return self._store_policy(name, data, source, replace=False)[1]

    def withdraw_policy(self, name: str, data: bytes) -> None:
        """Undo `claim_policy` after a seal failed: remove policy `name` (audited `policy-remove`) if the store still
        holds exactly `data` and no registered dataset names it; else keep it."""

        store, _ = self._policy_paths(name)

        def decide() -> tuple[str, dict] | dict:
            if not store.is_file() or store.read_bytes() != data or name in self._registered_policies():
                return {"event": "kept"}
            store.unlink()
            return "policy-remove", {"policy": name, "digest": hashlib.sha256(data).hexdigest()}

        self.audit.append_decided(decide)

    def _store_policy(self, name: str, data: bytes, source: str, *, replace: bool,
                      vet: Callable[[AttestationPolicy, str], list[str]] | None = None) -> tuple[str, bool]:
        """(SHA-256 of `data`, whether it was written) for `add_policy` (replace) and `claim_policy`."""

        store, shipped = self._policy_paths(name)
        if shipped.is_file():
            raise ValueError(f"policy name '{name}' is a shipped policy ({shipped}); a store policy must not shadow "
                             f"it: add yours under another name, e.g. {name}-site")
        policy = self._parse_store_policy(name, data, source)
        problems = vet(policy, source) if vet else []
        if problems:
            raise ValueError("; ".join(problems))
        digest = hashlib.sha256(data).hexdigest()

        def decide() -> tuple[str, dict] | dict:
            previous = store.read_bytes() if store.is_file() else None
            if previous is not None and not replace:
                if previous == data:
                    return {"event": "held"}
                raise ValueError(f"the broker store holds another policy named '{name}' ({store}), which datasets "
                                 f"sealed under it use; give yours another name (its name: key), or replace the "
                                 f"stored one deliberately with `medtee broker policy add {name} FILE`")
            store.parent.mkdir(mode=0o700, exist_ok=True)
            write_atomic(store, data, mode=0o600)
            return "policy-add", {"policy": name, "digest": digest,
                                  "replaced": hashlib.sha256(previous).hexdigest() if previous is not None else None}

        return digest, self.audit.append_decided(decide)["event"] == "policy-add"

    def _registered_policies(self) -> set[str]:
        """The policy names the registered datasets are set to."""
        return {json.loads(p.read_text()).get("policy") for p in (self.store_dir / "datasets").glob("*.json")}

    def policies(self) -> list[tuple[str, str]]:
        """(name, "store" or "shipped") of every policy file a dataset can be set to, by name."""
        return disk.policies(self.store_dir)

    def policy_file(self, name: str) -> tuple[Path, bool]:
        """The file policy `name` is read from and whether it is the store's (`store.policy_file`)."""
        return disk.policy_file(self.store_dir, name)

    def _policy_paths(self, name: str) -> tuple[Path, Path]:
        return disk.policy_paths(self.store_dir, name)

    def _read_policy_file(self, path: Path) -> bytes:
        from medtee.files import read_regular

        try:
            return read_regular(path, self.MAX_POLICY_BYTES)
        except FileNotFoundError:
            raise ValueError(f"{path}: no such policy file") from None
        except ValueError as e:  # NotRegularFile
            raise ValueError(f"{path} {e}; give a policy YAML file") from None
        except OSError as e:
            raise ValueError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None

    @staticmethod
    def _parse_store_policy(name: str, data: bytes, source: str):
        """A store policy file's content through the shipped policies' loader; its `name`, if set, must be `name`."""
        from omegaconf import OmegaConf

        from medtee.attestation.policy import policy_document, policy_from_mapping

        doc = policy_document(data, source)
        if doc.get("name", name) != name:
            raise ValueError(f"attestation policy {source}: says name '{doc.name}' but is stored as '{name}'; set "
                             f"name: {name} in it or store it under its own name")
        policy = policy_from_mapping(OmegaConf.merge(doc, {"name": name}), source)
        if policy.authenticity_only:
            raise ValueError(f"attestation policy {source} is authenticity_only: it checks only that evidence is "
                             f"genuine, so it cannot be a release policy; set authenticity_only: false and the "
                             f"requirements a release needs")
        return policy

    def _release_policy(self, name: str):
        """`_policy(name)`, refused (ValueError) when it cannot release a key (authenticity_only)."""
        policy, digest = self._policy(name)
        if policy.authenticity_only:
            raise ValueError(f"attestation policy '{name}' checks only that evidence is genuine and releases no key; "
                             f"choose a release policy (`medtee broker policy list`)")
        return policy, digest

    def _policy(self, name: str):
        """(policy, SHA-256 of its file) for policy `name` (the store's, else the shipped one), read at every call
        (policy edits need no restart) and parsed again only when the file's bytes changed: the digest is always
        that of the bytes the policy was parsed from."""
        from medtee.attestation.policy import read_policy_file

        path, stored = self.policy_file(name)
        data = self._read_policy_file(path)
        digest = hashlib.sha256(data).hexdigest()
        cached = self._policies.get(name)
        if cached is None or cached[0] != digest:
            if stored:
                policy = self._parse_store_policy(name, data, str(path))
            else:
                shipped = read_policy_file(path, name=name)
                policy, digest = shipped.policy, shipped.sha256
            cached = self._policies[name] = (digest, policy)
        return cached[1], cached[0]

    # -- the TEE's side ----------------------------------------------------------------------------------------------
    def _forget(self, nonce: bytes) -> tuple[str, str, float] | None:
        """Remove an outstanding nonce (lock held); its entry, or None if it is not outstanding."""
        entry = self._nonces.pop(nonce, None)
        if entry is not None:
            self._gone[hashlib.sha256(nonce).digest()] = None
            if len(self._gone) > MAX_REMEMBERED_NONCES:
                self._gone.popitem(last=False)
            for counter, key in ((self._per_dataset, entry[0]), (self._per_client, entry[1])):
                counter[key] -= 1
                if not counter[key]:
                    del counter[key]
        return entry

    def _prune(self, now: float) -> None:
        """Drop expired nonces (lock held); they are the oldest, so the scan stops at the first live one."""
        while self._nonces:
            nonce, (_, _, expires) = next(iter(self._nonces.items()))
            if expires > now:
                return
            self._forget(nonce)

    def challenge(self, dataset_id: str, *, client: str = LOCAL_CLIENT) -> bytes:
        """A single-use nonce for `dataset_id`; ChallengeRefused when the dataset or `client` has too many out."""
        self._load_registration(dataset_id)  # unknown datasets get no nonce
        nonce = secrets.token_bytes(NONCE_BYTES)
        with self._lock:
            now = self._clock()
            self._prune(now)
            for counter, key, limit, who in ((self._per_dataset, dataset_id, self.max_challenges_per_dataset, "dataset"),
                                             (self._per_client, client, self.max_challenges_per_client, "client")):
                if counter[key] >= limit:
                    retry = max(1.0, next(iter(self._nonces.values()))[2] - now)
                    raise ChallengeRefused(f"{who} {key} already has {limit} outstanding key-release challenges (the "
                                           f"limit); retry in {retry:.0f} s, when the oldest expires", retry)
            self._nonces[nonce] = (dataset_id, client, now + self.nonce_ttl_s)
            self._per_dataset[dataset_id] += 1
            self._per_client[client] += 1
        return nonce

    def _consume_nonce(self, dataset_id: str, nonce: bytes) -> str | None:
        """None if the nonce is valid (and now spent), else why not."""
        with self._lock:
            entry = self._forget(bytes(nonce))
            now = self._clock()
            self._prune(now)
            gone = entry is None and hashlib.sha256(bytes(nonce)).digest() in self._gone
        if entry is None:
            return "already used or expired" if gone else NEVER_ISSUED
        if entry[0] != dataset_id:
            return "issued for another dataset"
        if now > entry[2]:
            return "expired"
        return None

    def _count_unaudited(self, what: str, client: str) -> None:
        """A `what` (release or close) naming nothing this broker issued (anyone can send those): counted per client
        and logged at 1, 2, 4, 8, ... so that a flood is seen without a line per request, never appended to the audit
        log."""
        with self._lock:
            if len(self._unaudited) >= MAX_COUNTED_CLIENTS:
                self._unaudited.clear()
            self._unaudited[what, client] += 1
            count = self._unaudited[what, client]
        if count & (count - 1) == 0:
            named = "release id" if what == "close" else "nonce"
            log.warning("broker: %s refused for a %s this broker never issued, from %s (%d so far)", what, named,
                        client, count)

    def deny_malformed(self, error: RequestError, *, client: str = LOCAL_CLIENT) -> None:
        """Audit a release request that failed validation, when it names a registered dataset and a nonce the broker
        issued. That nonce is spent, as by any refused request (single use)."""
        dataset_id = error.fields.get("dataset_id")
        if dataset_id is None:
            return
        try:
            _, policy_name = self._load_registration(dataset_id)
        except UnknownDatasetError:
            return
        nonce = error.fields.get("nonce")
        if not isinstance(nonce, (bytes, bytearray)) or self._consume_nonce(dataset_id, nonce) == NEVER_ISSUED:
            self._count_unaudited("release", client)
            return
        self.audit.append("deny", **_audit_fields(dataset_id, policy_name, client, error.fields),
                          failed=["broker.request"])

    def release(self, *, dataset_id: str, nonce: bytes, evidence: Evidence, ephemeral_public_key: bytes,
                recipe_digest: str, manifest_digest: str, receipt_public_key: bytes | None = None,
                recipe: dict | None = None, client: str = LOCAL_CLIENT) -> tuple[bytes, ReleaseRecord]:
        """The data key wrapped to `ephemeral_public_key` and the release's record (its id is the hash of its
        `release` audit entry), or KeyReleaseDenied (audited either way, but for a nonce this broker never issued:
        anyone can send those, so they are counted per client, not appended).

        The nonce is spent first, so a request refused for any reason has used it up (single use). An exception from
        the attestation verifier is a denial (`broker.evidence`, naming only the exception type), never an error.
        A `receipt_public_key` enters the expected REPORT_DATA; the audit keeps its key id (SHA-256 hex). `recipe` (what
        `recipe_digest` covers) is checked against the policy's recipe rules; the audit keeps its mode.
        """

        from medtee.attestation import appraise, gpu_nonce, report_data
        from medtee.broker.protocol import RECEIPT_KEY_BYTES, ReleaseRecord

        manifest, policy_name = self._load_registration(dataset_id)
        problem = self._consume_nonce(dataset_id, nonce)
        audit = _audit_fields(dataset_id, policy_name, client,
                              {"nonce": nonce, "recipe_digest": recipe_digest, "manifest_digest": manifest_digest})
        if isinstance(receipt_public_key, (bytes, bytearray)) and len(receipt_public_key) == RECEIPT_KEY_BYTES:
            audit["receipt_key"] = hashlib.sha256(receipt_public_key).hexdigest()
        elif receipt_public_key is not None:
            audit["receipt_key"] = INVALID
        if recipe is not None:
            from medtee.attestation.policy import RUN_MODES

            audit["mode"] = recipe.get("mode") if recipe.get("mode") in RUN_MODES else INVALID

        def deny(verdict: Verdict) -> KeyReleaseDenied:
            self.audit.append("deny", **audit, failed=[c.name for c in verdict.failures()])
            return KeyReleaseDenied(verdict, dataset_id)

        if problem == NEVER_ISSUED:  # anyone can send those: counted, not audited (a flood would fill the disk)
            self._count_unaudited("release", client)
            raise KeyReleaseDenied(_denial("broker.nonce", FRESH_NONCE, problem, policy_name), dataset_id)
        if problem:
            raise deny(_denial("broker.nonce", FRESH_NONCE, problem, policy_name))
        try:
            check_digest(recipe_digest, "recipe_digest")
            check_digest(manifest_digest, "manifest_digest")
            eph_scheme = Scheme.for_public_key(bytes(ephemeral_public_key))
            if audit.get("receipt_key") == INVALID:
                raise ValueError(f"receipt_public_key must be {RECEIPT_KEY_BYTES} raw bytes (an Ed25519 public key)")
        except ValueError as e:
            raise deny(_denial("broker.request", "a well-formed release request", str(e), policy_name)) from None
        if manifest_digest != manifest.digest():
            raise deny(_denial("broker.manifest_digest", manifest.digest(), manifest_digest, policy_name))
        try:
            policy, audit["policy_sha256"] = self._release_policy(policy_name)
        except ValueError as e:  # a store policy removed or broken since registration: a denial, audited
            raise deny(_denial("broker.policy", f"release policy '{policy_name}' loadable", type(e).__name__,
                               policy_name)) from None
        try:
            bound = dict(nonce=nonce, ephemeral_public_key=ephemeral_public_key, recipe_digest=recipe_digest,
                         receipt_public_key=receipt_public_key)
            expected = report_data(**bound, gpu_evidence_digests=evidence.gpu_evidence_digests())
            audit["evidence"] = evidence.digest()
            verdict = appraise(evidence, policy, expected_report_data=expected, expected_gpu_nonce=gpu_nonce(**bound),
                               recipe_digest=recipe_digest, recipe=recipe, newest=self._newest)
        except Exception as e:  # whatever the verifier raises on hostile evidence is a denial, not a fault
            raise deny(_denial("broker.evidence", "evidence the attestation verifier can read", type(e).__name__,
                               policy_name)) from None
        if not verdict.ok:
            raise deny(verdict)
        data_key = self.unwrap_data_key(manifest)
        try:
            wrapped = hpke.wrap(data_key, ephemeral_public_key, scheme=eph_scheme, info=release_info(dataset_id, nonce))
        except ValueError as e:  # e.g. a low-order X25519 point: the evidence vouches for a key nothing can be wrapped to
            raise deny(_denial("broker.request", "an ephemeral public key a data key can be wrapped to",
                               type(e).__name__, policy_name)) from None
        spend = budget.spend(recipe, recipe_digest)
        released = {**audit, "simulated": verdict.simulated, "dp_spend": spend,
                    **({"split": budget.split(recipe)} if spend != budget.UNBOUNDED else {}),  # a verified recipe's
                    "ephemeral_key": hpke.key_id(eph_scheme, bytes(ephemeral_public_key))}
        limit, over = policy.recipe.dp_budget, []

        def decide() -> tuple[str, dict]:  # under the log's lock: two releases cannot both take the last of it
            d = self._decisions
            continues = budget.continuation(recipe, spend, dataset_id, releases=d.releases, newest=d.newest,
                                            continued=d.continued)
            entry = released if continues is None else {**released, "dp_spend": dict(budget.FREE), "dp_target": spend,
                                                        "resumes": continues}
            if limit.bounds() and (why := budget.refusal(limit, d.tally(dataset_id), entry["dp_spend"],
                                                         resuming=budget.resumes(recipe) and continues is None,
                                                         this_split=entry.get("split"))):
                over.append(why)
                return "deny", {**audit, "failed": ["broker.dp_budget"]}
            return "release", entry

        entry = self.audit.append_decided(decide)
        if over:
            raise KeyReleaseDenied(_denial("broker.dp_budget", *over[0], policy_name), dataset_id)
        return wrapped, ReleaseRecord(release_id=entry["hash"], audit_entry_sha256=entry["hash"])

    def close_release(self, release_id: str, *, record: dict, receipt_public_key: bytes, signature: bytes,
                      client: str = LOCAL_CLIENT) -> str:
        """Append a `close` entry (release id, dataset id, the record's digest) for an open release; its hash.

        Authority first: unless the release exists, bound a receipt key, `receipt_public_key` is that key and
        `signature` its signature of `protocol.close_message`, the answer is CloseNotAuthorized with the one message
        `CLOSE_REFUSED` whatever the cause, and a `close_refused` entry records the cause, unless the id names no
        release at all (anyone can send those: they are counted per client, not appended). To that key's holder
        only: a repeat with the same record returns the existing close entry's hash (nothing appended), one with
        another record is ReleaseClosedError (audited `close_refused`, reason `closed`). The check and the append
        hold the audit log's lock, so a release is closed once even across processes."""

        from medtee.broker.protocol import (
            CLOSE_REFUSED,
            CloseNotAuthorized,
            ReleaseClosedError,
            check_close_record,
            close_signature_valid,
            record_digest,
        )

        release_id = check_digest(release_id, "release_id")
        digest = record_digest(check_close_record(record))
        signature_ok = close_signature_valid(release_id, record, receipt_public_key, signature)  # whatever the id
        key_id = hashlib.sha256(bytes(receipt_public_key)).hexdigest()

        def decide() -> tuple[str, dict] | dict:
            released, closed = self._decisions.releases.get(release_id), self._decisions.closes.get(release_id)
            reason = _close_refusal(released, key_id, signature_ok)
            if reason == "unknown":
                return {"event": "close_refused", "reason": reason}  # not appended: it concerns no release
            if reason is None and closed is None:
                outputs = budget.close_outputs(record.get("outputs"))  # the run's own account, signed: what it left
                return "close", {"release_id": release_id, "dataset_id": released["dataset_id"], "client": client,
                                 "record_sha256": digest, **({"outputs": outputs} if outputs else {})}
            if reason is None and closed.get("record_sha256") == digest:
                return closed  # a retry after a lost answer
            return "close_refused", {"release_id": release_id, "client": client, "reason": reason or "closed"}

        entry = self.audit.append_decided(decide)
        if entry["event"] == "close":
            return entry["hash"]
        if entry["reason"] == "unknown":
            self._count_unaudited("close", client)
        elif entry["reason"] == "closed":
            raise ReleaseClosedError(f"release {release_id[:16]}... is closed already, with another teardown record: "
                                     f"a release closes once; a retry must send the record it was closed with")
        raise CloseNotAuthorized(CLOSE_REFUSED)


def _close_refusal(released: dict | None, key_id: str, signature_ok: bool) -> str | None:
    """Why a close naming the `release` entry `released` (None: no such entry) by the key `key_id` (SHA-256 hex) is
    refused, as audited (`unknown`, `no_receipt_key`, `wrong_key`, `bad_signature`); None when it is authorized."""
    import hmac

    if released is None:
        return "unknown"
    bound = released.get("receipt_key")
    if not bound:
        return "no_receipt_key"
    if not hmac.compare_digest(bound, key_id):
        return "wrong_key"
    return None if signature_ok else "bad_signature"

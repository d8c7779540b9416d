"""The broker store on disk: its lock, its registrations, and broker-key rotation that a crash cannot half-do.

Every :class:`~medtee.broker.service.EmbeddedBroker` holds a shared lock on `store.lock` for its life; `rotate`
takes it exclusively, so it refuses while any broker (`medtee broker serve`, a run's embedded broker, a seal, a
policy command) uses the store, and nothing opens the store while it rotates.

A rotation stages the new key, the re-wrapped registrations and then `plan.json` in `rotating/`; its `rotate`
audit entry is the commit point; only then are the staged files moved into place, the broker key first. Whoever
opens the store next after a crash finishes a rotation that was recorded (or whose old key was already moved out)
and removes one that was neither, `plan.json` first.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from medtee.broker.audit import AuditLog
from medtee.broker.protocol import UnknownDatasetError
from medtee.crypto import hpke
from medtee.crypto.hpke import Scheme
from medtee.crypto.signing import load_or_create_signing_key
from medtee.files import NotRegularFile, read_regular, write_atomic
from medtee.sealing.manifest import MAX_MANIFEST_BYTES, Manifest, SealedDataError, check_dataset_id, data_key_info

log = logging.getLogger("medtee.broker")

BROKER_KEY_NAME = "broker"
LOCK_NAME = "store.lock"
ROTATING = "rotating"  # the staging directory of a rotation
PLAN = "plan.json"  # written last into it: the staging is complete
MAX_REGISTRATION_BYTES = 2 * MAX_MANIFEST_BYTES  # datasets/<id>.json: a manifest (indented), a policy name
LOCK_WAIT_S = 30.0  # how long opening a store waits for a rotation to end


class StoreError(RuntimeError):
    """The store cannot be used: its lock is held (StoreBusy), or opening it failed (not a directory this user can
    write, its lock file replaced, a full disk)."""


class StoreBusy(StoreError):
    """The store's lock is held by another process (a broker using it, or a rotation)."""


class RotationInterrupted(OSError):
    """A rotation failed at or after its commit point: the next broker to open the store finishes it if its
    `rotate` entry is in the audit log, else removes it."""


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unusable(store_dir: Path, e: OSError) -> StoreError:
    """The StoreError for `e`, raised while opening the store at `store_dir`."""
    where = f" ({e.filename})" if e.filename else ""
    return StoreError(f"cannot open the broker store {store_dir}: {e.strerror or e}{where}; it must be a directory "
                      f"this user owns and can write (a broker takes its lock, {LOCK_NAME}, and may finish an "
                      f"interrupted rotation), not a read-only copy")


def _lock(store_dir: Path, mode: int, wait_s: float, busy: str):
    """`store.lock` open and flock'ed with `mode` (LOCK_SH or LOCK_EX), polling for up to `wait_s` seconds; StoreBusy
    with `busy` after that."""
    try:
        fd = os.open(store_dir / LOCK_NAME, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise unusable(store_dir, e) from None
    f = open(fd, "rb")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() >= deadline:
                f.close()
                raise StoreBusy(busy) from None
            time.sleep(0.05)


def hold(store_dir: Path, scheme: Scheme):
    """The open lock file of a broker using `store_dir` (shared; close it to let go), after finishing or removing an
    interrupted rotation, and creating the broker key (of `scheme`) if there is none: both under the exclusive lock,
    so that two processes opening a new store make one key. StoreBusy when a rotation holds the store for longer
    than LOCK_WAIT_S."""
    deadline = time.monotonic() + LOCK_WAIT_S
    busy = (f"the broker store {store_dir} is being rotated by another process (`medtee keys rotate`) for more "
            f"than {LOCK_WAIT_S:g} s; retry when it has ended")
    key = store_dir / f"{BROKER_KEY_NAME}.key"
    while True:
        f = _lock(store_dir, fcntl.LOCK_SH, max(0.0, deadline - time.monotonic()), busy)
        if not (store_dir / ROTATING).exists() and key.exists():
            return f
        f.close()
        try:  # once: a broker that made the key meanwhile holds the shared lock for its life
            exclusive = _lock(store_dir, fcntl.LOCK_EX, 0.0, busy)
        except StoreBusy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
            continue
        with exclusive:
            recover(store_dir)
            public = store_dir / f"{BROKER_KEY_NAME}.pub"
            if not key.exists() and os.path.lexists(public):
                raise StoreError(f"{key} is missing but {public} is there: the broker's private key was moved or "
                                 f"deleted; restore it from its backup (without it no data key sealed to this store "
                                 f"can be released, and a new key would not open them)")
            if not key.exists():
                hpke.write_keypair(store_dir, BROKER_KEY_NAME, scheme)


# -- registrations: datasets/<id>.json holds the manifest and the current release policy's name -----------------------
def registration_path(store_dir: Path, dataset_id: str) -> Path:
    return store_dir / "datasets" / f"{check_dataset_id(dataset_id)}.json"


def write_registration(path: Path, manifest: Manifest, policy: str) -> None:
    doc = {"manifest": json.loads(manifest.to_json()), "policy": policy}
    write_atomic(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def read_registration(store_dir: Path, dataset_id: str) -> tuple[Manifest, str]:
    """(manifest, policy name) of a registered dataset; UnknownDatasetError when it is not registered."""
    path = registration_path(store_dir, dataset_id)
    fix = "restore it or re-register the dataset (seal it again against this broker)"
    try:
        doc = json.loads(read_regular(path, MAX_REGISTRATION_BYTES).decode("utf-8"))
    except FileNotFoundError:
        fix = "seal it against this broker"
        raise UnknownDatasetError(f"dataset {dataset_id} is not registered with the broker at {store_dir}; {fix}",
                                  public=f"dataset {dataset_id} is not registered with this broker; {fix}") from None
    except NotRegularFile as e:
        raise SealedDataError(f"{path} {e}; {fix}") from None
    except OSError as e:
        raise SealedDataError(f"cannot read {path} ({e.strerror or type(e).__name__}); {fix}") from None
    except (ValueError, RecursionError):  # not UTF-8, not JSON
        raise SealedDataError(f"{path} is not valid JSON; {fix}") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("manifest"), dict) and isinstance(doc.get("policy"), str)):
        raise SealedDataError(f"{path} is not a registration (a JSON object with a manifest object and a policy "
                              f"name); {fix}")
    return Manifest.from_json(json.dumps(doc["manifest"]), source=str(path)), doc["policy"]


def datasets(store_dir: Path) -> list[str]:
    """Registered dataset ids."""
    return sorted(p.stem for p in (store_dir / "datasets").glob("*.json"))


# -- the owner's release policies: policies/NAME.yaml, read before the shipped conf/attestation/NAME.yaml -----------
def policy_paths(store_dir: Path, name: str) -> tuple[Path, Path]:
    """Where policy `name` is in the store and where it is shipped (ValueError for a name that is no file stem)."""
    import re

    from medtee.paths import conf_dir

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", name):
        raise ValueError(f"policy name '{name}' must be 1-64 letters, digits, _ or - (the policy's file stem)")
    return store_dir / "policies" / f"{name}.yaml", conf_dir() / "attestation" / f"{name}.yaml"


def policies(store_dir: Path) -> list[tuple[str, str]]:
    """(name, "store" or "shipped") of every policy file a dataset can be set to, by name (reads, never creates,
    the store)."""
    stored, shipped = (p.parent for p in policy_paths(store_dir, "x"))
    return sorted([(p.stem, "store") for p in stored.glob("*.yaml")] +
                  [(p.stem, "shipped") for p in shipped.glob("*.yaml")])


def policy_file(store_dir: Path, name: str) -> tuple[Path, bool]:
    """The file policy `name` is read from and whether it is the store's; ValueError naming the fix when there is
    none, or when a store file shadows a shipped policy."""
    stored, shipped = policy_paths(store_dir, name)
    if stored.is_file() and shipped.is_file():
        raise ValueError(f"{stored} shadows the shipped policy {shipped}, so the broker refuses it: rename it (e.g. "
                         f"to {name}-site.yaml) and set the datasets that use '{name}' to the new name")
    if stored.is_file() or shipped.is_file():
        return (stored, True) if stored.is_file() else (shipped, False)
    known = ", ".join(n for n, _ in policies(store_dir))
    raise ValueError(f"no attestation policy '{name}' in the broker's store ({stored.parent}) or shipped "
                     f"({shipped.parent}); known: {known}; add one with `medtee broker policy add {name} FILE`")


# -- rotation ----------------------------------------------------------------------------------------------------------
def rotate(store_dir: Path | str, dataset_dirs: list[Path] = (), *, scheme: Scheme | str | None = None) -> list[Manifest]:
    """Replace the broker key of `store_dir` and re-wrap every registered data key to the new one.

    The shards are untouched (the data keys do not change); manifests are re-signed by the owner key in the store,
    re-registered, and written into each of `dataset_dirs` (whose datasets must be registered here). The old
    private key moves to `retired/`. StoreBusy while any broker uses the store. Returns the new manifests.
    """
    store_dir = Path(store_dir)
    with _lock(store_dir, fcntl.LOCK_EX, 0.0,
               f"the broker store {store_dir} is in use (a `medtee broker serve`, a run with broker.url=embedded, a "
               f"seal or a policy command holds it); stop it, then rotate"):
        recover(store_dir)
        audit = AuditLog(store_dir / "audit.log")
        audit.check_mark()
        old_scheme, old_key = hpke.load_private_key(store_dir / f"{BROKER_KEY_NAME}.key")
        new_scheme = Scheme.parse(scheme) if scheme else old_scheme
        by_id = {}
        for d in map(Path, dataset_dirs):
            manifest = Manifest.load(d)
            if not os.access(d, os.W_OK) or not os.access(d / "manifest.json", os.W_OK):
                raise PermissionError(f"{d / 'manifest.json'} cannot be written, so its new manifest could not be "
                                      f"put there; make it writable or leave {d} off the command line")
            by_id[manifest.dataset_id] = d.resolve()
        registered = datasets(store_dir)
        unknown = sorted(set(by_id) - set(registered))
        if unknown:
            raise UnknownDatasetError(f"dataset(s) {', '.join(unknown)} are not registered with the broker at {store_dir}")
        (store_dir / "retired").mkdir(mode=0o700, exist_ok=True)  # a file in its place fails here, not after the commit
        staging = store_dir / ROTATING
        staging.mkdir(mode=0o700)
        try:
            _, new_pub = hpke.load_public_key(hpke.write_keypair(staging, BROKER_KEY_NAME, new_scheme))
            (staging / "datasets").mkdir()
            owner = load_or_create_signing_key(store_dir)
            rotated = []
            for dataset_id in registered:
                manifest, policy = read_registration(store_dir, dataset_id)
                data_key = hpke.unwrap(manifest.wrapped_data_key, old_key, scheme=Scheme.parse(manifest.scheme),
                                       info=data_key_info(dataset_id))
                manifest = replace(manifest, scheme=new_scheme.value, key_id=hpke.key_id(new_scheme, new_pub),
                                   wrapped_data_key=hpke.wrap(data_key, new_pub, scheme=new_scheme,
                                                              info=data_key_info(dataset_id))).signed(owner)
                write_registration(staging / "datasets" / f"{dataset_id}.json", manifest, policy)
                rotated.append(manifest)
            _sync_dir(staging / "datasets")
            plan = {"old_key": old_key.key_id, "new_key": hpke.key_id(new_scheme, new_pub), "datasets": registered,
                    "dataset_dirs": {i: str(d) for i, d in sorted(by_id.items())}}
            write_atomic(staging / PLAN, json.dumps(plan, indent=1).encode() + b"\n", sync_dir=True)
            _sync_dir(store_dir)
        except BaseException:  # nothing was recorded or moved: the store is as it was
            _remove(staging)
            raise
        try:
            audit.append("rotate", old_key=plan["old_key"], new_key=plan["new_key"], datasets=registered)  # the commit
        except OSError as e:
            raise RotationInterrupted(f"recording the rotation of the broker key in {store_dir} failed ({e}); the "
                                      f"next command that opens the store finishes it if the audit log holds its "
                                      f"entry, else removes it") from e
        try:
            _finish(store_dir, plan, recorded=True)
        except OSError as e:
            raise RotationInterrupted(f"the rotation of the broker key in {store_dir} to {plan['new_key']} is "
                                      f"recorded, but moving its files failed ({e}); remove the cause, then any "
                                      f"command that opens the store (e.g. `medtee broker audit budget`) finishes "
                                      f"it") from e
    return rotated


def _remove(staging: Path) -> None:
    """Remove a rotation's staging, `plan.json` first: a crash part-way leaves a staging without a plan, which is
    removed again, never finished."""
    (staging / PLAN).unlink(missing_ok=True)
    _sync_dir(staging)
    shutil.rmtree(staging)
    _sync_dir(staging.parent)


def _key_id(path: Path) -> str | None:
    return hpke.load_private_key(path)[1].key_id if path.exists() else None


def recover(store_dir: Path) -> None:
    """Finish or remove the rotation `rotating/` holds (the caller holds the store's lock exclusively): removed when
    it has no `plan.json` (its staging was incomplete, or its removal was), or when its entry is not in the audit log
    and the broker key was not moved yet; otherwise finished."""
    staging = store_dir / ROTATING
    if not staging.exists():
        return
    try:
        plan = json.loads((staging / PLAN).read_text(encoding="utf-8"))
    except FileNotFoundError:
        plan = None
    if plan is not None:
        AuditLog(store_dir / "audit.log").check_mark()  # a log rolled back behind the commit decides nothing
        recorded = _recorded(store_dir, plan)
        live = _key_id(store_dir / f"{BROKER_KEY_NAME}.key")
        if recorded or live in (None, plan["new_key"]):  # the old key is retired (or the new one in place)
            log.warning("finishing the rotation of the broker key of %s to %s that was interrupted", store_dir,
                        plan["new_key"])
            _finish(store_dir, plan, recorded=recorded)
            return
        log.warning("removing the unrecorded rotation of the broker key of %s that was interrupted; the key is "
                    "unchanged", store_dir)
    else:
        log.warning("removing what an interrupted rotation left in %s (no plan.json: its staging or its removal was "
                    "interrupted); the broker key is %s", staging, _key_id(store_dir / f"{BROKER_KEY_NAME}.key"))
    _remove(staging)


def _recorded(store_dir: Path, plan: dict) -> bool:
    return any(e.get("event") == "rotate" and e.get("new_key") == plan["new_key"]
               for e in AuditLog(store_dir / "audit.log").entries())


def _finish(store_dir: Path, plan: dict, *, recorded: bool) -> None:
    """Move a committed rotation's staged files into place and record it unless `recorded`; each step may be
    repeated after a crash."""
    staging, retired = store_dir / ROTATING, store_dir / "retired"
    retired.mkdir(mode=0o700, exist_ok=True)
    for suffix in ("key", "pub"):
        staged, live = staging / f"{BROKER_KEY_NAME}.{suffix}", store_dir / f"{BROKER_KEY_NAME}.{suffix}"
        if staged.exists():
            if live.exists():
                os.replace(live, retired / f"{BROKER_KEY_NAME}-{plan['old_key']}.{suffix}")
            os.replace(staged, live)
    _sync_dir(retired)
    _sync_dir(store_dir)
    if _key_id(store_dir / f"{BROKER_KEY_NAME}.key") != plan["new_key"]:  # its staged key removed by hand
        raise ValueError(f"{staging} holds a recorded rotation to broker key {plan['new_key']}, but neither it nor "
                         f"the store holds that key, so its registrations would be wrapped to a lost key; nothing "
                         f"more was moved: restore the store from its newest backup")
    for dataset_id in plan["datasets"]:
        staged = staging / "datasets" / f"{dataset_id}.json"
        if staged.exists():
            os.replace(staged, registration_path(store_dir, dataset_id))
    _sync_dir(store_dir / "datasets")
    for dataset_id, directory in plan["dataset_dirs"].items():
        manifest = read_registration(store_dir, dataset_id)[0]
        try:
            write_atomic(Path(directory) / "manifest.json", manifest.to_json().encode())
        except OSError as e:
            log.warning("could not write the new manifest of dataset %s into %s (%s): copy the field 'manifest' of "
                        "%s there", dataset_id, directory, type(e).__name__, registration_path(store_dir, dataset_id))
    if not recorded:  # the files had begun to move under a log that lost the entry
        AuditLog(store_dir / "audit.log").append("rotate", old_key=plan["old_key"], new_key=plan["new_key"],
                                                 datasets=plan["datasets"])
    _remove(staging)

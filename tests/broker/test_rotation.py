"""Broker-key rotation: re-wrapping without re-encrypting, refused while a broker uses the store, and a crash at
any step leaves the store rotated or as it was, never between (the next broker to open it finishes or undoes it)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medtee.broker import audit, store
from medtee.broker.service import EmbeddedBroker
from medtee.broker.store import StoreBusy, rotate
from medtee.cli import main
from medtee.crypto.hpke import Scheme
from medtee.sealing.manifest import Manifest
from medtee.sealing.reader import open_dataset
from medtee.sealing.seal import seal_records

from .conftest import make_records
from .test_service import release_request


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rotations(store_dir: Path) -> list[dict]:
    return [e for e in audit.AuditLog(store_dir / "audit.log").entries() if e["event"] == "rotate"]


def test_rotation_rewraps_without_reencrypting(sealed, broker):
    out, manifest, records, key = sealed
    shard_bytes = {s.name: (out / s.name).read_bytes() for s in manifest.shards}
    old_key_id = manifest.key_id
    broker.close()
    [new_manifest] = rotate(broker.store_dir, [out], scheme="hpke-x25519")
    assert new_manifest.key_id != old_key_id and new_manifest.scheme == "hpke-x25519"
    assert {s.name: (out / s.name).read_bytes() for s in manifest.shards} == shard_bytes
    ds = open_dataset(out)
    assert ds.manifest == new_manifest
    fresh = EmbeddedBroker(broker.store_dir)
    assert fresh.public_key()[0] is Scheme.hpke_x25519 and fresh.unwrap_data_key(new_manifest) == key
    with pytest.raises(Exception, match="manifest_digest"):
        release_request(fresh, manifest)  # the old manifest is no longer the registered one
    assert release_request(fresh, new_manifest) == key
    assert list((broker.store_dir / "retired").glob("broker-*.key"))
    assert [(e["old_key"], e["new_key"]) for e in rotations(broker.store_dir)] == [(old_key_id, new_manifest.key_id)]
    assert audit.verify(broker.store_dir / "audit.log").ok
    assert not (broker.store_dir / store.ROTATING).exists()


def test_what_earlier_runs_sealed_under_the_dataset_still_opens_after_a_rotation(sealed, broker):
    """Checkpoints and adapter.sealed are under keys derived from the manifest's content digest, which a rotation
    (new wrapping, new signature, new digest) leaves as it was; a file of the earlier derivation (whole manifest
    digest) opens while the dataset is not rotated, through the earlier keys."""
    from medtee.crypto.stream import StreamError, decrypt, derive_key, encrypt

    out, manifest, _, key = sealed
    for purpose in ("checkpoint", "adapter"):
        current = encrypt(b"state", derive_key(key, manifest.content_digest(), purpose))
        earlier = encrypt(b"state", derive_key(key, manifest.digest(), purpose))
        assert decrypt(earlier, derive_key(key, manifest.content_digest(), purpose), name="x",
                       earlier=(derive_key(key, manifest.digest(), purpose),)) == b"state"
    broker.close()
    [rotated] = rotate(broker.store_dir, [out], scheme="hpke-x25519")
    assert rotated.digest() != manifest.digest() and rotated.content_digest() == manifest.content_digest()
    now = derive_key(key, rotated.content_digest(), "adapter")
    assert decrypt(current, now, name="x", earlier=(derive_key(key, rotated.digest(), "adapter"),)) == b"state"
    with pytest.raises(StreamError, match="by a medtee before 2026-12 before `medtee keys rotate`"):
        decrypt(earlier, now, name="x", earlier=(derive_key(key, rotated.digest(), "adapter"),))
    changes = {"dataset_id": "other", "record_count": manifest.record_count + 1, "shards": manifest.shards[:-1],
               "release_policy": "x", "created": "2000-01-01T00:00:00Z", "key_check": "0" * 32}
    for name, changed in changes.items():  # every field but the key wrapping and its signer is the content
        assert dataclasses.replace(manifest, **{name: changed}).content_digest() != manifest.content_digest(), name


def test_a_dataset_another_trusted_owner_sealed_keeps_its_checkpoints_across_a_rotation(broker, tmp_path):
    """A remote sealer signs with its own key (trusted-owners/); the rotation re-signs with the store's owner key, so
    the signer changed too: with owner_public_key in the content digest, its checkpoints stopped opening."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from medtee.crypto.stream import decrypt, derive_key, encrypt

    hospital = Ed25519PrivateKey.generate()
    (broker.store_dir / "trusted-owners").mkdir()
    (broker.store_dir / "trusted-owners" / "hospital.pub").write_bytes(hospital.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    manifest = seal_records(make_records(12), tmp_path / "remote", broker=broker, policy="simulated",
                            dataset_id="remote-ds", signing_key=hospital)
    key = broker.unwrap_data_key(manifest)
    checkpoint = encrypt(b"state", derive_key(key, manifest.content_digest(), "checkpoint"))
    broker.close()
    [rotated] = rotate(broker.store_dir, [tmp_path / "remote"])
    assert rotated.owner_public_key != manifest.owner_public_key  # signed by the store's owner key now
    assert rotated.content_digest() == manifest.content_digest()
    assert decrypt(checkpoint, derive_key(key, rotated.content_digest(), "checkpoint"), name="x") == b"state"


def test_rotation_is_refused_while_a_broker_uses_the_store(sealed, broker, serve, capsys):
    """An HTTP broker (or any EmbeddedBroker) keeps the old key in memory: rotating under it would leave it
    releasing nothing it was asked for, so the rotation refuses, changing nothing."""
    out, manifest, _, key = sealed
    broker.close()
    server = serve()
    before, before_dataset = tree(broker.store_dir), tree(out)
    with pytest.raises(StoreBusy, match="is in use .*stop it, then rotate"):
        rotate(broker.store_dir, [out])
    assert main(["keys", "rotate", str(out), "--broker-dir", str(broker.store_dir)]) == 1
    assert "is in use (a `medtee broker serve`" in capsys.readouterr().err
    assert tree(broker.store_dir) == before and tree(out) == before_dataset
    server.close()
    server.broker.close()
    [new_manifest] = rotate(broker.store_dir, [out])
    assert EmbeddedBroker(broker.store_dir).unwrap_data_key(new_manifest) == key


def test_a_broker_opened_during_a_rotation_waits_for_it(sealed, broker, monkeypatch):
    out, manifest, _, key = sealed
    broker.close()
    with store._lock(broker.store_dir, store.fcntl.LOCK_EX, 0, "busy"):  # as `rotate` holds it
        monkeypatch.setattr(store, "LOCK_WAIT_S", 0.2)
        with pytest.raises(StoreBusy, match=r"is being rotated by another process .* for more than 0.2 s; retry"):
            EmbeddedBroker(broker.store_dir)
        monkeypatch.setattr(store, "LOCK_WAIT_S", 30)
        opened = []
        waiter = threading.Thread(target=lambda: opened.append(EmbeddedBroker(broker.store_dir)))
        waiter.start()
        time.sleep(0.3)
        assert not opened  # still waiting
    waiter.join(10)
    assert opened and opened[0].unwrap_data_key(manifest) == key


def crash_cases(mode: str, *args: Path) -> int:
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("rotation_crash.py")), mode, *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_a_crash_at_any_step_leaves_the_store_rotated_or_as_it_was(tmp_path):
    """Crashes before every file-system step of a rotation, then before every step of the next broker's opening of
    each store a crash left mid-rotation (which finishes or removes it), then the cases where a restored log lost
    the entry of a rotation whose files had begun to move: every store opens rotated or byte for byte as it was,
    and releases every data key."""
    template = tmp_path / "template"
    keys = {}
    with EmbeddedBroker(template / "broker") as broker:
        for dataset_id, directory in (("crash-a", "sealed"), ("crash-b", "other")):  # one listed, one not
            manifest = seal_records(make_records(4), template / directory, broker=broker, policy="simulated",
                                    dataset_id=dataset_id, rows_per_shard=2)
            keys[dataset_id] = broker.unwrap_data_key(manifest)
        old_key = broker.public_key()
    before = tree(template / "broker")
    before_manifest = (template / "sealed" / "manifest.json").read_bytes()
    points = crash_cases("rotate", template, tmp_path / "rotate") - 1
    assert points >= 20  # key pair, registrations, plan, the audit entry, the moves, the clean-up
    cases = [tmp_path / "rotate" / str(n) for n in range(1, points + 2)]  # every crash point, then a whole rotation
    interrupted = [c for c in cases if (c / "broker" / store.ROTATING).exists()]
    assert len(interrupted) >= points - 2
    opened = crash_cases("open", tmp_path / "open", *interrupted)
    assert opened > 2 * len(interrupted)  # the removal or the finishing had steps to crash before
    reopened_cases = sorted((tmp_path / "open").iterdir())
    for case in interrupted:
        staging = case / "broker" / store.ROTATING
        if (staging / store.PLAN).exists() and not (staging / "broker.key").exists():  # the files had begun to move
            lost = tmp_path / "lost" / case.name  # ... and the owner restored a log without the rotate entry
            shutil.copytree(case, lost)
            log = lost / "broker" / "audit.log"
            *kept, last = log.read_bytes().splitlines(keepends=True)
            assert json.loads(last)["event"] == "rotate"
            log.write_bytes(b"".join(kept))
            audit.mark_path(log).unlink()
            plan = json.loads((lost / "broker" / store.ROTATING / store.PLAN).read_text())
            plan["dataset_dirs"] = {"crash-a": str(lost / "sealed")}  # the copy's, not the case's
            (lost / "broker" / store.ROTATING / store.PLAN).write_text(json.dumps(plan))
    lost_cases = sorted((tmp_path / "lost").iterdir())
    assert len(lost_cases) >= 3
    outcomes = {}
    for case in cases + reopened_cases + lost_cases:
        store_dir, dataset, name = case / "broker", case / "sealed", str(case.relative_to(tmp_path))
        with EmbeddedBroker(store_dir) as reopened:  # finishes or undoes what the crash left
            assert not (store_dir / store.ROTATING).exists(), name
            assert audit.verify(store_dir / "audit.log").ok, name
            recorded = rotations(store_dir)
            if reopened.public_key() == old_key:
                outcomes[name] = "as it was"
                assert recorded == [], name
                assert tree(store_dir) == before, name
                assert (dataset / "manifest.json").read_bytes() == before_manifest, name
            else:
                outcomes[name] = "rotated"
                assert reopened.public_key()[0] is Scheme.hpke_x25519, name
                assert [e["new_key"] for e in recorded] == [reopened._key.key_id], name
                assert (store_dir / "retired" / f"broker-{recorded[0]['old_key']}.key").is_file(), name
                assert Manifest.load(dataset) == reopened._load_registration("crash-a")[0], name
            for dataset_id, key in keys.items():
                assert reopened.unwrap_data_key(reopened._load_registration(dataset_id)[0]) == key, (name, dataset_id)
            if case.parent.name != "open":  # (the release itself, once per first crash)
                registered = reopened._load_registration("crash-a")[0]
                assert release_request(reopened, registered) == keys["crash-a"], name
        if case.parent.name == "rotate":
            [again] = [m for m in rotate(store_dir, [dataset]) if m.dataset_id == "crash-a"]  # it rotates again
            assert Manifest.load(dataset) == again
    assert set(outcomes.values()) == {"as it was", "rotated"}
    for reopened_case in reopened_cases:  # a crash while opening changes nothing the first crash decided
        first = reopened_case.name.rsplit("-", 1)[0]
        assert outcomes[str(reopened_case.relative_to(tmp_path))] == outcomes[f"rotate/{first}"], reopened_case.name


def test_an_interrupted_rotation_is_finished_by_keys_rotate_too(sealed, broker, capsys):
    """`keys rotate` after a crash finishes (or undoes) the interrupted rotation first, then rotates as asked."""
    out, manifest, _, key = sealed
    broker.close()
    rotate(broker.store_dir, [out])
    staging = broker.store_dir / store.ROTATING
    staging.mkdir()
    (staging / "broker.key").write_text("half a key")  # a crash while staging: no plan.json yet
    assert main(["keys", "rotate", str(out), "--broker-dir", str(broker.store_dir)]) == 0
    assert "1 data key(s) re-wrapped" in capsys.readouterr().out
    assert not staging.exists() and len(rotations(broker.store_dir)) == 2
    assert EmbeddedBroker(broker.store_dir).unwrap_data_key(Manifest.load(out)) == key


def test_processes_opening_a_new_store_at_once_make_one_broker_key(tmp_path, monkeypatch):
    """Two seals started together on a fresh machine must not each make a broker key (one would wrap its data key
    to a key the store no longer holds): the key is made under the store's exclusive lock."""
    from medtee.crypto import hpke

    real = hpke.write_keypair

    def slow(*args, **kwargs):  # widen the window between "no key yet" and writing it
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(hpke, "write_keypair", slow)
    opened, failed = [], []

    def open_store():
        try:
            opened.append(EmbeddedBroker(tmp_path / "new"))
        except Exception as e:  # noqa: BLE001 (reported below)
            failed.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failed and len(opened) == 4
    assert len({b._key.key_id for b in opened}) == 1
    assert hpke.load_private_key(tmp_path / "new" / "broker.key")[1].key_id == opened[0]._key.key_id


def test_keys_rotate_on_a_full_disk_is_one_line_saying_what_happened(sealed, broker, monkeypatch, capsys):
    import errno

    out, manifest, _, key = sealed
    broker.close()
    before, before_dataset = tree(broker.store_dir), tree(out)

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:  # while staging: nothing changes
        m.setattr(store, "write_registration", full)
        assert main(["keys", "rotate", str(out), "--broker-dir", str(broker.store_dir)]) == 1
    err = capsys.readouterr().err
    assert "failed and changed nothing: [Errno 28] No space left on device" in err and "Traceback" not in err
    assert tree(broker.store_dir) == before and tree(out) == before_dataset
    real = store._finish
    with monkeypatch.context() as m:  # after the commit: recorded, and finished by the next broker
        m.setattr(store, "_finish", full)
        assert main(["keys", "rotate", str(out), "--broker-dir", str(broker.store_dir)]) == 1
    err = capsys.readouterr().err
    assert "is recorded, but moving its files failed ([Errno 28] No space left on device)" in err
    assert (broker.store_dir / store.ROTATING).exists() and len(rotations(broker.store_dir)) == 1
    assert store._finish is real
    with EmbeddedBroker(broker.store_dir) as reopened:
        assert reopened._key.key_id == rotations(broker.store_dir)[0]["new_key"]
        assert reopened.unwrap_data_key(Manifest.load(out)) == key

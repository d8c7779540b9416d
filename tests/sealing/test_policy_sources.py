"""`medtee seal --policy NAME|FILE`: a shipped name, a name in the --broker-dir store, or a policy YAML file (put
into that store), each enforced by the embedded broker at release; bad files refused with exit 2 and the fix."""

from __future__ import annotations

import hashlib
import json

import pytest

from medtee.attestation import collect_evidence
from medtee.attestation.simulated import SIMULATED_MEASUREMENT
from medtee.broker.protocol import KeyReleaseDenied, obtain_data_key
from medtee.broker.service import EmbeddedBroker
from medtee.cli import main
from medtee.paths import conf_dir
from medtee.sealing.reader import open_dataset

from .conftest import JSONL_RECORDS, make_records

SIMULATED = (conf_dir() / "attestation" / "simulated.yaml").read_text()
OTHER = "0f" * 48  # a measurement the simulated evidence does not have
RECIPE = "ab" * 32


def dev_policy(name: str | None, measurements=()) -> str:
    """The shipped simulated policy named `name` (no name key for None), pinning `measurements`."""
    head = f"name: {name}" if name else ""
    return SIMULATED.replace("name: simulated", head) + f"measurements: {json.dumps(list(measurements))}\n"


def release(store, out: str):
    """One release of the dataset in `out` from the broker store `store` (simulated evidence): the number of records
    the released key decrypts, or the names of the failed checks."""
    ds = open_dataset(out)
    def evidence(nonce, eph):
        return collect_evidence("simulated", None, nonce=nonce, ephemeral_public_key=eph, recipe_digest=RECIPE)

    try:
        got = obtain_data_key(EmbeddedBroker(store), dataset_id=ds.manifest.dataset_id, evidence_for=evidence,
                              manifest_digest=ds.manifest.digest(), recipe_digest=RECIPE)
    except KeyReleaseDenied as e:
        return [c.name for c in e.verdict.failures()]
    return len(ds.read_records(got.data_key))


def audit(store) -> list[dict]:
    return [json.loads(line) for line in (store / "audit.log").read_text().splitlines()]


def test_a_policy_file_is_stored_and_its_content_is_what_the_broker_enforces(jsonl, tmp_path, capsys):
    store = tmp_path / ".medtee" / "broker"
    ok = tmp_path / "site-dev.yaml"
    ok.write_text(dev_policy(None, [SIMULATED_MEASUREMENT.hex()]))  # named by its stem
    assert main(["seal", str(jsonl), "--out", "a", "--policy", str(ok), "--dataset-id", "file-a"]) == 0
    out = capsys.readouterr().out
    assert "release policy site-dev" in out and "policies/site-dev.yaml" in out
    assert open_dataset("a").manifest.release_policy == "site-dev"
    assert (store / "policies" / "site-dev.yaml").read_bytes() == ok.read_bytes()
    added = [e for e in audit(store) if e["event"] == "policy-add"]
    assert [(e["policy"], e["digest"]) for e in added] == [("site-dev", hashlib.sha256(ok.read_bytes()).hexdigest())]
    assert release(store, "a") == JSONL_RECORDS

    pinned = tmp_path / "pinned.yaml"
    pinned.write_text(dev_policy("site-pinned", [OTHER]))
    assert main(["seal", str(jsonl), "--out", "b", "--policy", str(pinned), "--dataset-id", "file-b"]) == 0
    assert release(store, "b") == ["policy.measurement"]  # the file's pin, not the shipped simulated policy

    assert main(["seal", str(jsonl), "--out", "c", "--policy", str(ok), "--dataset-id", "file-c"]) == 0  # same bytes
    assert len([e for e in audit(store) if e["event"] == "policy-add"]) == 2 and release(store, "c") == JSONL_RECORDS


def test_a_store_policy_name_is_sealed_and_released_under_that_policy(jsonl, tmp_path, capsys):
    store = tmp_path / "owner-store"
    source = tmp_path / "p.yaml"
    source.write_text(dev_policy("site-pinned", [OTHER]))
    EmbeddedBroker(store).add_policy("site-pinned", source)
    assert main(["seal", str(jsonl), "--out", "ds", "--policy", "site-pinned", "--dataset-id", "store-ds"]) == 2
    assert "does not exist yet: give the policy's YAML file" in capsys.readouterr().err  # default store: none there
    assert not (tmp_path / "ds").exists() and not (tmp_path / ".medtee").exists()

    assert main(["seal", str(jsonl), "--out", "ds", "--policy", "site-pinned", "--broker-dir", str(store),
                 "--dataset-id", "store-ds"]) == 0
    assert "release policy site-pinned" in capsys.readouterr().out
    assert release(store, "ds") == ["policy.measurement"]
    source.write_text(dev_policy("site-pinned", [SIMULATED_MEASUREMENT.hex()]))
    assert main(["broker", "policy", "add", "site-pinned", str(source), "--broker-dir", str(store)]) == 0
    assert release(store, "ds") == JSONL_RECORDS  # the store's current content decides, as for `policy set`
    assert main(["seal", str(jsonl), "--out", "ds2", "--policy", "nope", "--broker-dir", str(store)]) == 2
    assert "broker policy add nope FILE" in capsys.readouterr().err


def test_a_file_never_replaces_another_policy_of_its_name(jsonl, tmp_path, capsys):
    store = tmp_path / ".medtee" / "broker"
    first = tmp_path / "first.yaml"
    first.write_text(dev_policy("site", [SIMULATED_MEASUREMENT.hex()]))
    assert main(["seal", str(jsonl), "--out", "a", "--policy", str(first)]) == 0
    other = tmp_path / "other.yaml"
    other.write_text(dev_policy("site", [OTHER]))
    capsys.readouterr()
    assert main(["seal", str(jsonl), "--out", "b", "--policy", str(other)]) == 2
    err = capsys.readouterr().err
    assert "the broker store holds another policy named 'site'" in err and "broker policy add site" in err
    assert (store / "policies" / "site.yaml").read_bytes() == first.read_bytes() and not (tmp_path / "b").exists()

    variant = tmp_path / "variant.yaml"
    variant.write_text(dev_policy("snp_h200"))
    assert main(["seal", str(jsonl), "--out", "b", "--policy", str(variant)]) == 2
    assert "a shipped policy" in capsys.readouterr().err and "snp_h200-site" not in str(list(store.rglob("*")))
    shipped = conf_dir() / "attestation" / "snp_h200.yaml"
    assert main(["seal", str(jsonl), "--out", "b", "--policy", str(shipped)]) == 0  # the shipped file itself
    assert open_dataset("b").manifest.release_policy == "snp_h200" and not (store / "policies" / "snp_h200.yaml").exists()


@pytest.mark.parametrize("name, text, words", [
    ("typo.yaml", "provider: simulated\nallow_simulatd: true\n", ["unknown key 'allow_simulatd'", "spelling"]),
    ("type.yaml", "vmpl: zero\n", ["key 'vmpl'", "fix its value"]),
    ("syntax.yaml", "provider: [file\n", ["not a YAML mapping"]),
    ("list.yaml", "- provider\n", ["is a YAML list", "write a mapping"]),
    ("prod.yaml", "production: true\nprovider: simulated\n", ["production policies need provider sev_snp"]),
    ("my.policy.yaml", "provider: simulated\n", ["its name 'my.policy'", "set name: in it"]),
    ("missing.yaml", None, ["does not exist", "give a policy YAML file"]),
    ("adir.yaml", "", ["give a policy YAML file"]),
], ids=["unknown key", "wrong type", "yaml syntax", "list", "inconsistent", "bad name", "missing", "directory"])
def test_a_bad_policy_file_is_refused_with_exit_2_before_anything_is_written(jsonl, tmp_path, capsys, name, text,
                                                                             words):
    path = tmp_path / name
    if name == "adir.yaml":
        path.mkdir()
    elif text is not None:
        path.write_text(text)
    assert main(["seal", str(jsonl), "--out", "ds", "--policy", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medtee: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err and all(w in err for w in words), err
    assert not (tmp_path / "ds").exists() and not (tmp_path / ".medtee").exists()


def test_a_remote_broker_takes_no_policy_file(jsonl, tmp_path, capsys):
    path = tmp_path / "site.yaml"
    path.write_text(dev_policy("site"))
    assert main(["seal", str(jsonl), "--out", "ds", "--policy", str(path), "--broker", "https://127.0.0.1:9"]) == 2
    assert "medtee broker policy add NAME" in capsys.readouterr().err
    assert main(["seal", str(jsonl), "--out", "ds", "--policy", "site", "--broker", "https://127.0.0.1:9"]) == 2
    assert "a remote broker's store cannot be read from here" in capsys.readouterr().err


def test_concurrent_seals_cannot_both_claim_a_policy_name(tmp_path):
    """The check and the write hold the audit log's lock: of two seals claiming 'site' with different policies, one
    stores its policy and the other is refused (before, the second could overwrite the first's)."""
    from concurrent.futures import ThreadPoolExecutor

    brokers = [EmbeddedBroker(tmp_path / "store") for _ in range(2)]
    texts = [dev_policy("site", [SIMULATED_MEASUREMENT.hex()]).encode(), dev_policy("site", [OTHER]).encode()]

    def claim(i):
        try:
            return brokers[i].claim_policy("site", texts[i], f"file{i}")
        except ValueError as exc:
            return str(exc)

    for _ in range(5):
        (tmp_path / "store" / "policies" / "site.yaml").unlink(missing_ok=True)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(claim, range(2)))
        assert sorted(map(type, results), key=str) == [bool, str] and True in results, results
        winner = results.index(True)
        assert (tmp_path / "store" / "policies" / "site.yaml").read_bytes() == texts[winner]


def test_the_policy_stored_is_the_one_read_and_checked(jsonl, tmp_path, monkeypatch):
    """The file is read once: changing it after the check changes nothing the broker enforces."""
    from medtee.attestation import policy as policy_module

    path = tmp_path / "site.yaml"
    checked = dev_policy("site", [OTHER])
    path.write_text(checked)
    read = policy_module.read_policy_file

    def read_then_swap(*args, **kwargs):
        result = read(*args, **kwargs)
        path.write_text(dev_policy("site"))  # what an attacker with write access to the file swaps in
        return result

    monkeypatch.setattr(policy_module, "read_policy_file", read_then_swap)
    assert main(["seal", str(jsonl), "--out", "a", "--policy", str(path)]) == 0
    stored = tmp_path / ".medtee" / "broker" / "policies" / "site.yaml"
    assert stored.read_text() == checked


def test_a_refused_seal_takes_back_the_policy_it_added(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    records = make_records(12)
    records[7]["messages"][0]["role"] = "doctor"  # refused when the seal reaches it, after the policy was added
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    path = tmp_path / "site.yaml"
    path.write_text(dev_policy("site", [OTHER]))
    assert main(["seal", str(bad), "--out", "a", "--policy", str(path)]) == 2
    store = tmp_path / ".medtee" / "broker"
    assert not (store / "policies" / "site.yaml").exists() and not (tmp_path / "a").exists()
    assert [e["event"] for e in audit(store) if e["event"].startswith("policy")] == ["policy-add", "policy-remove"]
    path.write_text(dev_policy("site", [SIMULATED_MEASUREMENT.hex()]))  # corrected, and sealed again
    assert main(["seal", str(_good(tmp_path)), "--out", "a", "--policy", str(path)]) == 0


def _good(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in make_records(12)))
    return good


def test_a_policy_file_differing_from_the_shipped_one_of_its_name_makes_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "simulated.yaml"
    path.write_text(dev_policy(None, [OTHER]))  # named by its stem: the shipped 'simulated', but another policy
    assert main(["seal", str(_good(tmp_path)), "--out", "a", "--policy", str(path)]) == 2
    assert not (tmp_path / ".medtee").exists() and not (tmp_path / "a").exists()


def test_no_dataset_is_registered_under_a_policy_changed_while_it_was_sealed(jsonl, tmp_path, monkeypatch, capsys):
    """Another seal's failure (withdrawing the policy) or the owner's `policy add` while this seal writes: the dataset
    would have been registered under content its sealer never checked."""
    path = tmp_path / "site.yaml"
    path.write_text(dev_policy("site", [OTHER]))
    register = EmbeddedBroker.register

    def changed_meanwhile(self, manifest, **kwargs):
        (self.store_dir / "policies" / "site.yaml").write_text(dev_policy("site"))  # no measurement pinned
        return register(self, manifest, **kwargs)

    monkeypatch.setattr(EmbeddedBroker, "register", changed_meanwhile)
    assert main(["seal", str(jsonl), "--out", "a", "--policy", str(path)]) == 2
    assert "was changed or removed while the dataset was sealed" in capsys.readouterr().err
    store = tmp_path / ".medtee" / "broker"
    assert not (tmp_path / "a").exists() and not list((store / "datasets").glob("*.json"))
    assert "register" not in [e["event"] for e in audit(store)]


def test_two_seals_of_one_dataset_id_register_it_once(tmp_path, monkeypatch):
    """The "registered for other data" check runs under the audit log's lock: two seals racing with one id used to
    both succeed, leaving one of them a dataset that can never be released."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from medtee.sealing.seal import seal_records

    check = EmbeddedBroker._check_registration

    def slow_check(self, manifest, path):
        check(self, manifest, path)
        time.sleep(0.3)  # the other seal reaches its check meanwhile

    monkeypatch.setattr(EmbeddedBroker, "_check_registration", slow_check)
    brokers = [EmbeddedBroker(tmp_path / "store") for _ in range(2)]

    def seal(i):
        try:
            return seal_records(make_records(6, tag=f"T{i}"), tmp_path / f"out{i}", broker=brokers[i],
                                policy="simulated", dataset_id="ds-same")
        except FileExistsError as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(seal, range(2)))
    assert sorted(type(r).__name__ for r in results) == ["FileExistsError", "Manifest"], results
    loser = next(i for i, r in enumerate(results) if isinstance(r, FileExistsError))
    assert not (tmp_path / f"out{loser}").exists()
    assert [e["event"] for e in audit(tmp_path / "store")].count("register") == 1

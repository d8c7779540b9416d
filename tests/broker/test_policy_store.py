"""The data owner's policy store (<broker>/policies/NAME.yaml): add/list/show/set, validation, shadowing, audit,
edits without restart, measurement pinning against the real SEV-SNP vectors, and the `broker policy` CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from attestation.conftest import vectors  # noqa: F401 (the shared vectors fixture)

from medtee.attestation import Evidence
from medtee.attestation.simulated import SIMULATED_MEASUREMENT
from medtee.attestation.snp import SnpReport
from medtee.broker import audit
from medtee.broker.protocol import KeyReleaseDenied
from medtee.cli import main
from medtee.crypto.hpke import EphemeralKey
from medtee.paths import conf_dir

from .conftest import RECIPE, simulated_evidence

SIMULATED = (conf_dir() / "attestation" / "simulated.yaml").read_text()
OTHER = "0f" * 48
VECTOR = ("snp/automata/report.bin", "snp/automata/vek_cert.der")  # a genuine Milan report and its VCEK


def policy_file(tmp_path, text: str, name: str = "p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def dev_policy(name: str, measurements=()) -> str:
    """The shipped simulated policy under another name, pinning `measurements`."""
    return SIMULATED.replace("name: simulated", f"name: {name}") + f"measurements: {json.dumps(list(measurements))}\n"


def failed(broker, manifest, evidence_for=simulated_evidence()) -> list[str] | str:
    """One release attempt: the failed checks, or "released"."""
    nonce = broker.challenge(manifest.dataset_id)
    eph = EphemeralKey.generate()
    try:
        broker.release(dataset_id=manifest.dataset_id, nonce=nonce, evidence=evidence_for(nonce, eph.public_bytes),
                       ephemeral_public_key=eph.public_bytes, recipe_digest=RECIPE, manifest_digest=manifest.digest())
    except KeyReleaseDenied as e:
        return [c.name for c in e.verdict.failures()]
    return "released"


def test_store_policy_is_used_and_edits_apply_without_restart(sealed, broker, tmp_path):
    _, manifest, _, _ = sealed
    broker.add_policy("site-dev", policy_file(tmp_path, dev_policy("site-dev")))
    broker.set_policy("test-ds", "site-dev")
    assert failed(broker, manifest) == "released"
    broker.add_policy("site-dev", policy_file(tmp_path, dev_policy("site-dev", [OTHER])))
    assert failed(broker, manifest) == ["policy.measurement"]
    stored = broker.store_dir / "policies" / "site-dev.yaml"
    stored.write_text(dev_policy("site-dev", [SIMULATED_MEASUREMENT.hex()]))  # edited in place
    assert failed(broker, manifest) == "released"
    policy, digest = broker._policy("site-dev")
    assert policy.name == "site-dev" and digest == hashlib.sha256(stored.read_bytes()).hexdigest()


def test_decisions_record_the_digest_of_the_policy_file_they_were_made_under(sealed, broker, tmp_path):
    """An auditor must know which version of a policy a key was released or denied under, not only its name."""
    _, manifest, _, _ = sealed
    first = broker.add_policy("site-dev", policy_file(tmp_path, dev_policy("site-dev")))
    broker.set_policy("test-ds", "site-dev")
    assert failed(broker, manifest) == "released"
    second = broker.add_policy("site-dev", policy_file(tmp_path, dev_policy("site-dev", [OTHER])))
    assert failed(broker, manifest) == ["policy.measurement"]
    entries = [json.loads(line) for line in (broker.store_dir / "audit.log").read_text().splitlines()]
    decided = {e["event"]: e["policy_sha256"] for e in entries if e["event"] in ("policy", "release", "deny")}
    assert decided == {"policy": first, "release": first, "deny": second} and first != second
    shipped = hashlib.sha256((conf_dir() / "attestation" / f"{manifest.release_policy}.yaml").read_bytes())
    assert [e["policy_sha256"] for e in entries if e["event"] == "register"] == [shipped.hexdigest()]


def test_add_is_atomic_and_audited_with_digests_only(broker, tmp_path):
    source = policy_file(tmp_path, dev_policy("site-dev", [OTHER]))
    digest = broker.add_policy("site-dev", source)
    stored = broker.store_dir / "policies" / "site-dev.yaml"
    assert stored.read_bytes() == source.read_bytes() and digest == hashlib.sha256(source.read_bytes()).hexdigest()
    assert stored.stat().st_mode & 0o777 == 0o600 and not list(stored.parent.glob(".*"))
    second = broker.add_policy("site-dev", policy_file(tmp_path, dev_policy("site-dev"), "q.yaml"))
    entries = [json.loads(line) for line in (broker.store_dir / "audit.log").read_text().splitlines()]
    assert [(e["event"], e["policy"], e["digest"], e["replaced"]) for e in entries] == [
        ("policy-add", "site-dev", digest, None), ("policy-add", "site-dev", second, digest)]
    assert OTHER not in (broker.store_dir / "audit.log").read_text()
    assert audit.verify(broker.store_dir / "audit.log").ok


def test_a_store_policy_must_not_shadow_a_shipped_one(sealed, broker, tmp_path):
    with pytest.raises(ValueError, match="is a shipped policy .* add yours under another name, e.g. snp_h200-site"):
        broker.add_policy("snp_h200", policy_file(tmp_path, dev_policy("snp_h200")))
    assert not (broker.store_dir / "policies").exists()
    (broker.store_dir / "policies").mkdir()
    (broker.store_dir / "policies" / "simulated.yaml").write_text(dev_policy("simulated", [OTHER]))  # by hand
    with pytest.raises(ValueError, match="shadows the shipped policy .* rename it"):
        broker.set_policy("test-ds", "simulated")
    assert failed(broker, sealed[1]) == ["broker.policy"]  # a release under it is denied, and audited
    last = json.loads((broker.store_dir / "audit.log").read_text().splitlines()[-1])
    assert last["event"] == "deny" and last["failed"] == ["broker.policy"]


@pytest.mark.parametrize("text, message", [
    ("provider: [file\n", "not a YAML mapping"),
    ("- provider\n- file\n", "is a YAML list"),
    ("no_such_field: 1\n", "no_such_field"),
    ("measurements: [abc]\n", "measurements: 'abc' is not 96 hex characters"),
    ("production: true\nprovider: simulated\n", "production policies"),
    ("name: other\n", "says name 'other' but is stored as 'mine'"),
    (b"\xff\xfe\x00", "not a YAML mapping"),
], ids=["yaml syntax", "list", "unknown field", "bad measurement", "inconsistent", "name mismatch", "not utf-8"])
def test_bad_policy_file_is_refused_naming_file_and_problem(broker, tmp_path, text, message):
    source = tmp_path / "p.yaml"
    source.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message) as err:
        broker.add_policy("mine", source)
    assert str(source) in str(err.value)
    assert not (broker.store_dir / "policies" / "mine.yaml").exists()
    log = broker.store_dir / "audit.log"
    assert not log.exists() or "policy-add" not in log.read_text()


@pytest.mark.parametrize("name", ["../escape", "", "a/b", "x" * 65, "dot.name"])
def test_policy_names_are_file_stems(broker, tmp_path, name):
    with pytest.raises(ValueError, match="must be 1-64 letters, digits, _ or -"):
        broker.add_policy(name, policy_file(tmp_path, dev_policy("x")))


def test_unknown_name_lists_both_kinds(sealed, broker, tmp_path):
    broker.add_policy("site-dev", policy_file(tmp_path, dev_policy("site-dev")))
    with pytest.raises(ValueError, match="no attestation policy 'nope'.*site-dev.*snp_h200.*policy add nope FILE"):
        broker.set_policy("test-ds", "nope")


def vector_evidence(vectors, report: str, cert: str):
    return lambda nonce, eph: Evidence(provider="file", snp_report=(vectors / report).read_bytes(),
                                       certificates=((vectors / cert).read_bytes(),))


def test_pinned_measurement_decides_with_real_evidence(vectors, sealed, broker, tmp_path):  # noqa: F811
    _, manifest, _, _ = sealed
    measurement = SnpReport.parse((vectors / VECTOR[0]).read_bytes()).measurement.hex()
    for name, pinned in (("pin-other", OTHER), ("pin-vector", measurement)):
        broker.add_policy(name, policy_file(tmp_path, f"provider: file\nmeasurements: [{pinned}]\n", f"{name}.yaml"))
    broker.set_policy("test-ds", "pin-other")
    other = failed(broker, manifest, vector_evidence(vectors, *VECTOR))
    assert "policy.measurement" in other
    broker.set_policy("test-ds", "pin-vector")
    pinned = failed(broker, manifest, vector_evidence(vectors, *VECTOR))
    assert pinned != "released" and "binding.report_data" in pinned  # the vector is bound to another nonce
    assert "policy.measurement" not in pinned
    assert set(other) - set(pinned) == {"policy.measurement"}  # the one thing the pin changed


# -- the CLI -----------------------------------------------------------------------------------------------------


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_add_list_show_set(sealed, broker, tmp_path, capsys):
    source = policy_file(tmp_path, dev_policy("site-dev"))
    where = ("--broker-dir", str(broker.store_dir))
    code, out, _ = cli(capsys, "broker", "policy", "add", "site-dev", str(source), *where)
    assert code == 0 and hashlib.sha256(source.read_bytes()).hexdigest() in out and "policy set DATASET_ID" in out
    code, out, _ = cli(capsys, "broker", "policy", "list", *where)
    assert code == 0 and "site-dev\tstore" in out.splitlines() and "snp_h200\tshipped" in out.splitlines()
    assert cli(capsys, "broker", "policy", "show", "site-dev", *where)[1] == source.read_text()
    assert cli(capsys, "broker", "policy", "show", "snp_h200", *where)[1] == \
        (conf_dir() / "attestation" / "snp_h200.yaml").read_text()
    code, out, _ = cli(capsys, "broker", "policy", "set", "test-ds", "site-dev", *where)
    assert code == 0 and "release policy is now 'site-dev'" in out
    assert json.loads((broker.store_dir / "datasets" / "test-ds.json").read_text())["policy"] == "site-dev"


@pytest.mark.parametrize("args, message", [
    (("add", "snp_h100", "FILE"), "is a shipped policy"),
    (("add", "mine", "missing.yaml"), "missing.yaml: no such policy file"),
    (("add", "mine", "BAD"), "measurements: 'abc' is not 96 hex"),
    (("show", "nope"), "no attestation policy 'nope'"),
    (("set", "test-ds", "nope"), "no attestation policy 'nope'"),
    (("set", "no-such-ds", "simulated"), "not registered"),
    (("set", "test-ds", "../x"), "must be 1-64 letters"),
])
def test_cli_errors_are_one_line_exit_2(sealed, broker, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    policy_file(tmp_path, dev_policy("x"), "FILE")
    policy_file(tmp_path, "measurements: [abc]\n", "BAD")
    code, out, err = cli(capsys, "broker", "policy", *args, "--broker-dir", str(broker.store_dir))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err, err


def test_cli_refuses_a_directory_that_is_no_broker_store(tmp_path, capsys):
    """Verbs that change the store refuse a directory that is none; `list` and `show` read the shipped policies
    (a fresh broker host starts from one), say so, and create nothing."""
    code, _, err = cli(capsys, "broker", "policy", "set", "ds", "simulated", "--broker-dir", str(tmp_path / "typo"))
    assert code == 2 and "no broker store at" in err
    code, out, err = cli(capsys, "broker", "policy", "list", "--broker-dir", str(tmp_path / "typo"))
    assert code == 0 and "snp_h200\tshipped" in out and "no broker store at" in err and "shipped policies only" in err
    code, out, err = cli(capsys, "broker", "policy", "show", "snp_h200", "--broker-dir", str(tmp_path / "typo"))
    assert code == 0 and "measurements" in out and "shipped policies only" in err
    code, out, err = cli(capsys, "broker", "policy", "show", "site", "--broker-dir", str(tmp_path / "typo"))
    assert code == 2 and out == "" and "no attestation policy 'site'" in err
    assert not (tmp_path / "typo").exists()


def test_serve_defaults_come_from_the_modules(monkeypatch, capsys):
    from medtee.broker import server

    monkeypatch.setattr(server, "DEFAULT_PORT", 4321)
    monkeypatch.setattr(server.Limits, "max_connections", 77)
    with pytest.raises(SystemExit):
        main(["broker", "serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default 4321;" in text and "gets 503 (default 77)" in text and "(default 1024)" in text


def test_help_does_not_import_the_http_server():
    probe = ("import sys\nfrom medtee.cli import build_parser\nbuild_parser().format_help()\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('uvicorn', 'starlette', 'omegaconf')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


TYPO_RULES = [
    ("qlora.rnak", r"recipe.fields\[0\].key=qlora.rnak: qlora has no setting rnak \(did you mean qlora.rank\?\)"),
    ("privacy.epsilon", r"privacy has no setting epsilon; its settings: .*dp"),
    ("trainer.lr.max", r"trainer.lr is a single setting, with nothing inside it named max"),
    ("qlorra.rank", r"a recipe has no setting qlorra \(did you mean qlora\?\); its sections: hardware, "),
]


def with_rule(key: str) -> str:
    import yaml

    doc = yaml.safe_load(dev_policy("site-dev"))
    doc["recipe"]["fields"] = [{"key": key, "max": 16}]
    return yaml.safe_dump(doc)


@pytest.mark.parametrize("key, message", TYPO_RULES)
def test_a_rule_on_a_setting_no_recipe_has_is_refused_by_every_tool_that_reads_the_policy(
        sealed, broker, tmp_path, capsys, monkeypatch, key, message):
    """Such a rule releases nothing (every recipe lacks the setting): the owner hears of the typo when storing the
    policy, sealing under it or composing a recipe with it, not from refused releases later."""
    import re

    from medtee import config

    source = policy_file(tmp_path, with_rule(key), "site-dev.yaml")
    code, out, err = cli(capsys, "broker", "policy", "add", "site-dev", str(source), "--broker-dir",
                         str(broker.store_dir))
    assert code == 2 and out == "" and re.search(message, err), err
    assert not (broker.store_dir / "policies" / "site-dev.yaml").exists()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    code, out, err = cli(capsys, "seal", "d.jsonl", "--out", "sealed-typo", "--policy", str(source),
                         "--broker-dir", str(tmp_path / "new-store"))
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "sealed-typo").exists() and not (tmp_path / "new-store").exists()
    with pytest.raises(config.ConfigError, match=message):
        config.check(config.compose(["recipe=demo", f"attestation.recipe.fields=[{{key:{key},max:16}}]"]))


@pytest.mark.parametrize("key", ["qlora.rank", "model.weights_sha256", "sweep.parameters.anything",
                                 "release.max_exposure_at", "privacy.dp.target_epsilon", "model.tiny"])
def test_rules_on_every_setting_a_recipe_can_have_are_stored(broker, tmp_path, capsys, key):
    source = policy_file(tmp_path, with_rule(key), "site-dev.yaml")
    code, _, err = cli(capsys, "broker", "policy", "add", "site-dev", str(source), "--broker-dir",
                       str(broker.store_dir))
    assert code == 0, err

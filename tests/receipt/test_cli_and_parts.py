"""`medtee receipt verify` exit codes and output; source_digest; SecretBuffer; statement input checks."""

from __future__ import annotations

import base64
import copy
import json
import pickle
import shutil

import pytest

from medtee.cli import main
from medtee.crypto.secret import SecretBuffer
from medtee.paths import conf_dir
from medtee.receipt.statement import source_digest

from .conftest import METRICS
from .test_receipt import VLEK_TIME, vector_run


def test_cli_exit_0_when_verified(run, capsys):
    assert main(["receipt", "verify", str(run.receipt), "--adapter", str(run.adapter)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("VERIFIED") and "SIMULATED" in out and "FAIL" not in out


def test_cli_exit_1_names_every_failed_check(run, capsys):
    run.adapter.write_bytes(b"another adapter")
    assert main(["receipt", "verify", str(run.receipt), "--adapter", str(run.adapter), "--policy", "snp_h200"]) == 1
    captured = capsys.readouterr()
    assert "REJECTED" in captured.out and "FAIL authenticity: SIMULATED" in captured.out
    assert f"receipt rejected: attestation, authenticity, file {run.adapter}" in captured.err


def test_cli_json_and_policy_file(run, capsys, tmp_path):
    policy = shutil.copy(conf_dir() / "attestation" / "simulated.yaml", tmp_path / "mine.yaml")
    assert main(["receipt", "verify", str(run.receipt), "--policy", str(policy), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["simulated"] and {c["name"] for c in doc["checks"]} >= {"signature", "binding"}


def test_cli_policy_file_without_a_name_is_named_by_its_stem(run, capsys, tmp_path):
    text = (conf_dir() / "attestation" / "simulated.yaml").read_text().replace("name: simulated\n", "")
    (tmp_path / "site-dev.yaml").write_text(text)
    assert main(["receipt", "verify", str(run.receipt), "--policy", str(tmp_path / "site-dev.yaml")]) == 0
    assert "under policy 'site-dev'" in capsys.readouterr().out


@pytest.mark.parametrize("text, words", [
    ("provider: [file\n", ["not a YAML mapping", "line 2"]),
    ("allow_simulatd: true\n", ["unknown key 'allow_simulatd'", "correct its spelling"]),
], ids=["yaml syntax", "unknown key"])
def test_cli_malformed_policy_file_exits_2_naming_the_problem(run, capsys, tmp_path, text, words):
    (tmp_path / "bad.yaml").write_text(text)
    assert main(["receipt", "verify", str(run.receipt), "--policy", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medtee: receipt verify: unusable input: attestation policy ") and err.count("\n") == 1
    assert all(w in err for w in words), err


def test_cli_at_selects_the_appraisal_time(vectors, run, capsys, tmp_path):
    receipt = str(vector_run(vectors, run))
    site = tmp_path / "vector-site.yaml"
    site.write_text((conf_dir() / "attestation" / "authenticity.yaml").read_text()
                    .replace("name: authenticity", "name: vector-site").replace("authenticity_only: true", "authenticity_only: false")
                    + "recipe:\n  modes: [train, eval, sweep, generate]\n  min_aggregate: 1\n")
    assert main(["receipt", "verify", receipt, "--policy", str(site), "--at", VLEK_TIME.isoformat(), "--json"]) == 1
    assert [c["name"] for c in json.loads(capsys.readouterr().out)["checks"] if not c["ok"]] == ["binding"]
    assert main(["receipt", "verify", receipt, "--policy", str(site), "--at", "2026-01-01T00:00:00", "--json"]) == 1
    failed = [c for c in json.loads(capsys.readouterr().out)["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["binding", "attestation"] and "amd.vlek.validity" in failed[1]["reason"]


@pytest.mark.parametrize("args, word", [
    (["--at", "yesterday"], "ISO 8601"), (["--policy", "no-such-policy"], "no attestation policy"),
    (["--policy", "missing/file.yaml"], "does not exist"), (["--adapter", "/nonexistent/adapter"], "cannot read"),
])
def test_cli_exit_2_for_bad_arguments(run, capsys, args, word):
    assert main(["receipt", "verify", str(run.receipt), *args]) == 2
    assert word in capsys.readouterr().err


@pytest.mark.parametrize("content, word", [
    (b"not json at all", "not a json"), (b'{"payload": ""}', "not a dsse envelope"), (None, "no such file"),
])
def test_cli_exit_2_for_unusable_receipts(tmp_path, capsys, content, word):
    path = tmp_path / "receipt.dsse.json"
    if content is not None:
        path.write_bytes(content)
    assert main(["receipt", "verify", str(path)]) == 2
    assert word in capsys.readouterr().err.lower()


def test_cli_given_a_run_directory_names_its_receipt(run, capsys):
    """The output directory a run printed, given instead of its receipt: exit 2 naming the file inside."""
    assert main(["receipt", "verify", str(run.receipt.parent)]) == 2
    err = capsys.readouterr().err
    assert f"a run's receipt is its {run.receipt.parent / 'receipt.dsse.json'}" in err and err.count("\n") == 1


def test_cli_exit_2_for_a_statement_missing_predicate_fields(run, capsys):
    doc = json.loads(run.receipt.read_bytes())
    statement = json.loads(base64.b64decode(doc["payload"]))
    del statement["predicate"]["attestation"]["evidence"]
    doc["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    run.receipt.write_text(json.dumps(doc))
    assert main(["receipt", "verify", str(run.receipt)]) == 2
    assert "predicate.attestation.evidence" in capsys.readouterr().err


def test_source_digest_covers_py_yaml_pem_by_path_and_content(tmp_path):
    pkg = tmp_path / "medtee"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "p.yaml").write_text("k: v\n")
    (pkg / "sub" / "r.pem").write_text("PEM\n")
    first = source_digest(pkg)
    (pkg / "notes.txt").write_text("ignored")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.py").write_text("ignored")
    assert source_digest(pkg) == first
    (pkg / "sub" / "p.yaml").write_text("k: w\n")
    assert source_digest(pkg) != first
    (pkg / "sub" / "p.yaml").write_text("k: v\n")
    (pkg / "sub" / "r.pem").rename(pkg / "r.pem")
    assert source_digest(pkg) != first
    assert len(source_digest()) == 64


def test_secret_buffer_wipes_in_place_and_hides_itself():
    key = SecretBuffer(b"\x01" * 32)
    view = memoryview(key)
    assert repr(key) == str(key) == f"{key}" == "SecretBuffer(32 bytes, hidden)"
    for copier in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="cannot be pickled"):
            copier(key)
    key.wipe()
    assert bytes(view) == bytes(32) and len(key) == 32
    with SecretBuffer(b"\x02" * 4) as scoped:
        assert scoped == b"\x02" * 4
    assert scoped == bytes(4)


@pytest.mark.parametrize("change, word", [
    (dict(metrics={**METRICS, "note": "text"}), "metrics"), (dict(metrics={"x": float("inf")}), "metrics"),
    (dict(teardown={"x": object()}), "teardown"), (dict(subjects={"recipe": "00" * 32}), "subject"),
    (dict(subjects={"a": "not hex"}), "subject"), (dict(started=VLEK_TIME.replace(tzinfo=None)), "started"),
])
def test_statement_inputs_are_checked(run, change, word):
    from medtee.attestation import Evidence, Verdict, load_policy
    from medtee.receipt import statement as st

    evidence = Evidence.from_json(run.statement["predicate"]["attestation"]["evidence"])
    args = dict(recipe={}, recipe_digest="ab" * 32, model_revision=None, weight_digests={}, dataset_id="d",
                manifest_digest="cd" * 32, evidence=evidence, policy=load_policy("simulated"),
                verdict=Verdict.of([], simulated=True, policy="simulated"), release=run.release,
                receipt_public_key=run.signer.public_bytes, started=VLEK_TIME, ended=VLEK_TIME, metrics=METRICS,
                teardown={})
    assert st.build_statement(**args)["predicate"]["run"]["metrics"] == METRICS
    with pytest.raises(ValueError, match=word):
        st.build_statement(**{**args, **change})


def test_a_policy_that_pins_measurements_rejects_a_receipt_whose_evidence_has_another(run, capsys, tmp_path):
    """The data owner's pinned image (`medtee image measure --into`) decides: any other measurement fails."""
    from medtee.attestation.snp import SnpReport

    payload = json.loads(base64.b64decode(json.loads(run.receipt.read_text())["payload"]))
    report = base64.b64decode(payload["predicate"]["attestation"]["evidence"]["snp_report"])
    measured = SnpReport.parse(report).measurement.hex()
    # the owner's own policy (a copy of the shipped one under the shipped name would be refused as a lookalike)
    text = (conf_dir() / "attestation" / "simulated.yaml").read_text().replace("name: simulated", "name: pinned")
    for pinned, code in (("ab" * 48, 1), (measured, 0)):
        policy = tmp_path / "pinned.yaml"
        policy.write_text(text.replace("measurements: []", f"measurements: ['{pinned}']")
                          if "measurements: []" in text else text + f"measurements: ['{pinned}']\n")
        assert main(["receipt", "verify", str(run.receipt), "--policy", str(policy), "--json"]) == code
        checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
        assert ("policy.measurement" in checks["attestation"]["reason"]) == (code == 1), checks["attestation"]


def test_a_deeply_nested_envelope_is_unusable_not_a_traceback(tmp_path, capsys):
    path = tmp_path / "deep.json"
    path.write_text('{"payload": "e30=", "payloadType": "x", "signatures": ' + "[" * 3000 + "]" * 3000 + "}")
    assert main(["receipt", "verify", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err

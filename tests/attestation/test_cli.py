import argparse
import json

import pytest

from medtee.attestation.cli import add_parser
from medtee.paths import conf_dir


def run(*argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["attest", "verify", *argv])
    return args.handler(args)


def test_genuine_evidence_exits_0(vectors, capsys):
    rc = run("--snp-report", str(vectors / "snp/automata/report.bin"),
             "--snp-cert", str(vectors / "snp/automata/vek_cert.der"),
             "--gpu-report", str(vectors / "nvidia/nvtrust/local_gpu_verifier_samples/hopperAttestationReport.txt"),
             "--gpu-certs", str(vectors / "nvidia/nvtrust/local_gpu_verifier_samples/hopperCertChain.txt"),
             "--policy", "authenticity")
    assert rc == 0 and capsys.readouterr().out.startswith("ACCEPTED")


def test_vlek_with_clock_and_json(vectors, capsys):
    rc = run("--snp-report", str(vectors / "snp/trustee/snp/test-vlek-report.bin"),
             "--snp-cert", str(vectors / "snp/trustee/snp/test-vlek.der"), "--at", "2025-06-01T00:00:00",
             "--policy", "authenticity", "--json")
    assert rc == 0 and '"ok": true' in capsys.readouterr().out


def test_rejected_evidence_exits_1_listing_checks(vectors, capsys):
    rc = run("--snp-report", str(vectors / "snp/go-sev-guest/attestation.bin"),
             "--snp-cert", str(vectors / "snp/go-sev-guest/vcek.testcer"), "--policy", "snp_h100")
    out = capsys.readouterr().out
    assert rc == 1 and "policy.debug: expected DEBUG=0, got DEBUG=1" in out


def test_wrong_nonce_exits_1(vectors):
    assert run("--snp-report", str(vectors / "snp/automata/report.bin"),
               "--snp-cert", str(vectors / "snp/automata/vek_cert.der"), "--nonce", "00" * 64,
               "--policy", "authenticity") == 1


@pytest.mark.parametrize("extra", [
    ["--snp-report", "/nonexistent/report.bin"],
    ["--nonce", "xyz"],
    ["--at", "yesterday"],
    [],
])
def test_unusable_input_exits_2(vectors, capsys, extra):
    base = ["--snp-report", str(vectors / "snp/automata/report.bin")] if "--snp-report" not in extra and extra else []
    assert run(*base, *extra, "--policy", "authenticity") == 2
    assert "medtee: attest verify:" in capsys.readouterr().err


def test_unknown_policy_exits_2(capsys):
    assert run("--snp-report", "x", "--policy", "nope") == 2


def _file(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_policy_file_accepts_genuine_evidence(vectors, tmp_path, capsys):
    text = (conf_dir() / "attestation" / "authenticity.yaml").read_text().replace("name: authenticity\n", "")
    rc = run("--snp-report", str(vectors / "snp/automata/report.bin"),
             "--snp-cert", str(vectors / "snp/automata/vek_cert.der"),
             "--policy", _file(tmp_path, "auditor.yaml", text), "--json")
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["ok"] and doc["policy"] == "auditor"  # a file without name: is named by its stem


def test_policy_file_content_decides(vectors, tmp_path, capsys):
    evidence = ["--snp-report", str(vectors / "snp/go-sev-guest/attestation.bin"),
                "--snp-cert", str(vectors / "snp/go-sev-guest/vcek.testcer")]
    strict = (conf_dir() / "attestation" / "snp_h100.yaml").read_text().replace("name: snp_h100", "name: site")
    assert run(*evidence, "--policy", _file(tmp_path, "strict.yaml", strict)) == 1
    assert "policy.debug: expected DEBUG=0, got DEBUG=1" in capsys.readouterr().out
    lax = strict.replace("allow_debug: false", "allow_debug: true")
    assert run(*evidence, "--policy", _file(tmp_path, "lax.yaml", lax), "--json") == 1
    failed = [c["name"] for c in json.loads(capsys.readouterr().out)["checks"] if not c["ok"]]
    assert failed and "policy.debug" not in failed


@pytest.mark.parametrize("text, words", [
    ("authenticity_onyl: true\n", ["unknown key 'authenticity_onyl'", "correct its spelling"]),
    ("min_guest_svn: many\n", ["key 'min_guest_svn'", "fix its value"]),
    ("provider: [file\n", ["not a YAML mapping", "line 2"]),
    ("vmpl: 0\nvmpl: 1\n", ["found duplicate key vmpl, line 2"]),
], ids=["unknown key", "wrong type", "yaml syntax", "duplicate key"])
def test_malformed_policy_file_exits_2_naming_key_and_fix(vectors, tmp_path, capsys, text, words):
    path = _file(tmp_path, "bad.yaml", text)
    assert run("--snp-report", str(vectors / "snp/automata/report.bin"), "--policy", path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"medtee: attest verify: attestation policy {path}: ") and err.count("\n") == 1
    assert all(w in err for w in words), err


def test_missing_policy_file_exits_2(capsys, tmp_path):
    assert run("--snp-report", "x", "--policy", str(tmp_path / "none.yaml")) == 2
    assert "does not exist" in capsys.readouterr().err
